"""What `--actor.entropy_coef 0` (the launcher's default, --bai.entropy on) costs OpenRLHF 0.11.2's actor step.

With entropy_coef None OpenRLHF computes no entropy; with 0 its Actor.forward(return_entropy=True) runs
openrlhf.models.utils.compute_entropy on the fp32 logits it already has (softmax, logsumexp, a product and a sum
over the vocabulary) and ppo_actor logs the mean as entropy_loss; the loss is unchanged (`if entropy_coef != 0`).
This times that function against the log-probabilities OpenRLHF computes from the same logits in every step
(log_probs_from_logits), forward and backward through a real autograd graph as in the actor step, and measures the
memory autograd keeps for it until backward ends (saved-tensor hooks: whatever it saves besides the logits).

    python benchmarks/bench_entropy_cost.py [--tokens 1024] [--vocab 32000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the micro-batch (batch x length)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    import torch

    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable

    make_flash_attn_importable()  # openrlhf.models imports flash_attn; on a machine without CUDA, its CPU stand-in
    from openrlhf.models.utils import compute_entropy, log_probs_from_logits

    torch.manual_seed(0)
    base = torch.randn(1, args.tokens, args.vocab)
    labels = torch.randint(0, args.vocab, (1, args.tokens))

    def step(with_entropy: bool) -> tuple[float, int]:
        logits = base.clone().requires_grad_(True)  # the model's output, fp32 as Actor.forward makes it
        kept = []

        def pack(tensor):  # every tensor autograd saves for backward while the entropy is computed
            if tensor.data_ptr() != logits.data_ptr():
                kept.append(tensor.numel() * tensor.element_size())
            return tensor

        t0 = time.perf_counter()
        log_probs = log_probs_from_logits(logits, labels)
        if with_entropy:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                entropy = compute_entropy(logits)
            entropy.mean().item()  # what is logged
        log_probs.mean().backward()  # the loss does not contain the entropy (coef 0)
        return time.perf_counter() - t0, sum(kept)

    step(False)  # warm-up; the first entropy step also compiles compute_entropy (it is torch.compile'd)
    first_entropy_s = step(True)[0]
    plain, timed = [], []
    for _ in range(args.repeats):  # alternated, so both see the same machine
        plain.append(step(False)[0])
        timed.append(step(True))
    # The fastest of each: on a shared machine the slow runs measure the neighbours.
    plain_ms, with_ms = 1e3 * min(plain), 1e3 * min(t for t, _ in timed)
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"{args.tokens} tokens x {args.vocab} vocabulary, fp32 logits {logits_mb:.0f} MiB, "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"log-probs forward+backward: {plain_ms:.1f} ms; with compute_entropy: {with_ms:.1f} ms "
          f"(+{with_ms - plain_ms:.1f} ms, x{with_ms / plain_ms:.2f})")
    print(f"first step with entropy (torch.compile of compute_entropy): {first_entropy_s:.1f} s, once per process")
    print(f"kept for backward by the entropy's graph: {timed[0][1] / 2**20:.0f} MiB "
          f"({timed[0][1] / (logits_mb * 2**20):.2f} x the logits)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
