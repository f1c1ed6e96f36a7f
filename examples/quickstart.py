"""Quick start on CPU: per-token log-probs from allo_kernels next to the eager fp32 path, values and gradients.

Runs the Triton kernels under Triton's CPU interpreter (set before importing allo_kernels), so what is printed is
the very kernel a GPU would run, checked against the plain-torch formula.
"""

import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ALLO_KERNELS_BACKEND", "triton")

import torch

import allo_kernels as ak


def main() -> None:
    torch.manual_seed(0)
    batch, seq, vocab = 2, 17, 3000
    logits = (torch.randn(batch, seq, vocab) * 2).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (batch, seq))
    ids[0, :4] = -100  # prompt tokens carry no loss

    x = logits.clone().requires_grad_()
    t0 = time.perf_counter()
    logp = ak.token_logprobs(x[:, :-1], ids[:, 1:])  # strided rows, no copy
    logp.sum().backward()
    t_ours = time.perf_counter() - t0

    y = logits.clone().requires_grad_()
    ref = torch.log_softmax(y[:, :-1].float(), -1).gather(-1, ids[:, 1:].clamp(min=0)[..., None])[..., 0]
    ref = ref * (ids[:, 1:] != -100)
    ref.sum().backward()

    print(f"allo token_logprobs (Triton interpreter) on [{batch}, {seq - 1}, {vocab}] bf16: {t_ours * 1e3:.1f} ms")
    print(f"  max |logp - eager fp32 logp|  = {(logp - ref).abs().max().item():.2e}")
    print(f"  max |grad - eager fp32 grad|  = {(x.grad.float() - y.grad.float()).abs().max().item():.2e}")
    print(f"  sequence log-probs: {[round(v, 3) for v in logp.sum(-1).tolist()]}")


if __name__ == "__main__":
    main()
