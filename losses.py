"""The three distillation loss terms of DistilBERT, one pure function each.

Sanh et al. 2019, section 2 "Knowledge distillation", paragraph "Training loss": the student is
trained on a linear combination of the distillation loss L_ce over the teacher's soft targets, the
masked language modelling loss L_mlm, and a cosine embedding loss L_cos aligning hidden states
(defaults 5.0 * L_ce + 2.0 * L_mlm + 1.0 * L_cos, as the reference train.py). The formulas follow
the reference distiller.py. Every term is computed in float32, even under bfloat16 autocast.
Each term is written plainly first; L_ce_chunked, the same L_ce with its gradient fused for the
(N, V) vocabulary logits of pretraining, comes right after L_ce.

A teacher without an MLM head (a sentence encoder) has no soft targets for L_ce; two more terms
serve it (tinydistil.LOSSES, studies/retention_sts.md): L_hid, the cosine loss on the layers below
the last, and L_pool, the cosine loss on the mean-pooled sentence embedding.

Section 4.1, "DistilBERT (D)": a second distillation during fine-tuning, from a teacher already
fine-tuned on the task, as the reference run_squad_w_distillation.py. Its loss is
(1 - alpha) * task loss + alpha * KD term, the KD term being L_ce on the class logits,
L_kd_span on SQuAD's start and end distributions, L_kd_mse for STS-B's regression.

Used by `python tinydistil.py pretrain` and `eval --teacher`; tested by test_all.py.
"""
import torch
import torch.nn.functional as F


def L_ce(s_logits, t_logits, temperature=2.0):
    """Distillation loss over N rows of (N, V) logits, with temperature T:

        L_ce = T^2 * (1/N) * sum_i sum_v p_iv * (log p_iv - log q_iv)
        p = softmax(t_logits / T),  q = softmax(s_logits / T)

    i.e. KL(p || q) with reduction batchmean, as the reference's KLDivLoss; T^2 keeps the gradient
    scale independent of T (Hinton et al. 2015). Pretraining passes every non-pad token, masked or
    not; fine-tuning's distillation (tasks/distil.py) the task's class logits. t_logits gets no
    gradient (the teacher's). Pretraining computes the same value with L_ce_chunked.
    """
    T = temperature
    log_q = F.log_softmax(s_logits.float() / T, dim=-1)
    p = F.softmax(t_logits.detach().float() / T, dim=-1)
    return T * T * F.kl_div(log_q, p, reduction="batchmean")


def L_ce_chunked(s_logits, t_logits, temperature=2.0):
    """L_ce, same formula and value, with its gradient computed together with the loss, a few rows
    at a time: what pretraining uses over the (N, V) vocabulary logits. The gradient has the closed
    form dL_ce/ds_iv = T * (q_iv - p_iv) / N, so the (N, V) float32 temporaries autograd would keep
    (about a dozen of 250 MB each at 16 x 128 tokens, every one a fresh page-faulted allocation on
    CPU) never exist. 3.5x faster than L_ce here; at fine-tuning's 2 or 3 classes there is nothing
    to save, so that uses L_ce.
    """
    return _SoftTargetKL.apply(s_logits, t_logits.detach(), float(temperature))


class _SoftTargetKL(torch.autograd.Function):
    """L_ce_chunked's forward (the loss and, row chunk by row chunk, its gradient) and backward."""
    ROWS = 64  # rows per chunk: a 64 x 30522 float32 chunk (7.8 MB) is reused, not page-faulted
    # On a GPU each chunk is ~10 short kernels, launched one by one: big chunks (125 MB of float32
    # at V = 30522) keep it busy, 2 or 3 of them per micro-batch of 2,048 to 2,560 rows.
    CUDA_ROWS = 1024

    @staticmethod
    def forward(ctx, s_logits, t_logits, T):
        N = s_logits.shape[0]
        grad = torch.empty(s_logits.shape, dtype=torch.float32, device=s_logits.device)  # (N, V)
        kl = torch.zeros((), dtype=torch.float32, device=s_logits.device)
        step = _SoftTargetKL.CUDA_ROWS if s_logits.is_cuda else _SoftTargetKL.ROWS
        for i in range(0, N, step):
            rows = slice(i, i + step)
            log_p = F.log_softmax(t_logits[rows].float() / T, dim=-1)
            log_q = F.log_softmax(s_logits[rows].float() / T, dim=-1)
            p = log_p.exp()
            kl += (p * (log_p - log_q)).sum()
            torch.sub(log_q.exp_(), p, out=grad[rows])  # q - p
        ctx.save_for_backward(grad)
        ctx.scale, ctx.dtype = T / N, s_logits.dtype
        return kl * (T * T / N)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out * ctx.scale).to(ctx.dtype), None, None


def L_kd_span(s_logits, t_logits, attention_mask, temperature=2.0):
    """SQuAD's distillation term (run_squad_w_distillation.py): the mean of the soft-target losses
    on the start and on the end distributions over each window's tokens, s/t_logits (B, T, 2):

        L_kd_span = (L_ce(s_start, t_start, T) + L_ce(s_end, t_end, T)) / 2

    Unlike the reference, padding is left out of both distributions (probability 0 for the teacher
    and the student): its logits mean nothing, and then a cached teacher row does not depend on the
    batch its window was padded in.
    """
    pad = ~attention_mask.bool()[..., None]  # (B, T, 1)
    s = s_logits.float().masked_fill(pad, -1e4)  # exp(-1e4 / T) is 0 in float32: no -inf * 0 nans
    t = t_logits.float().masked_fill(pad, -1e4)
    start = L_ce(s[..., 0], t[..., 0], temperature)
    end = L_ce(s[..., 1], t[..., 1], temperature)
    return (start + end) / 2


def L_kd_mse(s_pred, t_pred):
    """Distillation for a regression head (STS-B): the mean squared distance to the teacher's
    prediction, (1/N) * sum_i (s_i - t_i)^2. A score has no distribution, so no temperature."""
    return F.mse_loss(s_pred.float(), t_pred.detach().float())


def L_mlm(s_logits, labels):
    """Masked language modelling loss: mean over the positions with labels != -100 of

        -log softmax(s_logits)[label]

    s_logits (..., V), labels (...) with -100 where nothing is predicted.
    """
    flat_logits = s_logits.float().reshape(-1, s_logits.size(-1))  # (N, V)
    return F.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=-100)


def L_cos(s_hidden, t_hidden):
    """Cosine embedding loss between student and teacher hidden states, N rows of (N, H):

        L_cos = (1/N) * sum_i (1 - <s_i, t_i> / (|s_i| |t_i|))

    the reference's CosineEmbeddingLoss with target +1 and reduction mean.
    """
    s, t = s_hidden.float(), t_hidden.float()
    return F.cosine_embedding_loss(s, t, s.new_ones(s.size(0)))


def L_hid(s_states, t_states):
    """Cosine loss on the hidden states of the layers below the last, K pairs of (N, H) rows: each
    student layer against the teacher layer it was copied from (TinyBERT's and MiniLM's hidden-state
    matching, with DistilBERT's cosine in place of their MSE):

        L_hid = (1/K) * sum_k L_cos(s_states[k], t_states[k])
    """
    return sum(L_cos(s, t) for s, t in zip(s_states, t_states)) / len(s_states)


def L_pool(s_hidden, t_hidden, attention_mask):
    """Cosine loss between the sentence embeddings of student and teacher, B sequences of (B, T, H)
    last hidden states with their (B, T) attention mask:

        e_b = sum_t m_bt h_bt / sum_t m_bt       (the mean over the real tokens)
        L_pool = (1/B) * sum_b (1 - <e^s_b, e^t_b> / (|e^s_b| |e^t_b|))

    The embedding sentence-transformers (mean pooling) and `eval --zero-shot` read; its MSE
    distillation of the normalised embeddings is this loss times 2/H.
    """
    m = attention_mask.float()[..., None]  # (B, T, 1)
    s = (s_hidden.float() * m).sum(1) / m.sum(1)  # (B, H)
    t = (t_hidden.float() * m).sum(1) / m.sum(1)  # (B, H)
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def total_loss(terms, weights):
    """sum_k weights[k] * terms[k] over the given terms (weights: {"ce": 5, "mlm": 2, "cos": 1})."""
    return sum(weights[k] * v for k, v in terms.items())
