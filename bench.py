"""
Benchmark focalpo's real training step on a random-init model of a named shape (no download, no dataset).

    python bench.py --shape=tiny                                        # CPU smoke test, seconds
    python bench.py --shape=qwen2.5-0.5b --batch_size=8 --grad_accum=1 --gradient_checkpointing=true
    python bench.py --shape=mistral-7b --weights=bf16 --gradient_checkpointing=true --batch_size=8 --grad_accum=2

Pairs are seeded random token ids of variable length (prompts 64-512 tokens, responses 32-512, cut to
--max_length the way focalpo cuts real data). It times the reference pass, then --warmup untimed and --steps timed
calls of focalpo.train_step, and prints tokens/s (non-pad tokens of chosen + rejected), MFU (6·N FLOPs per token,
N = all parameters, against --peak_tflops), peak GPU memory and the padding fraction. Any other focalpo option
(--weights, --gradient_checkpointing, --batch_size, --grad_accum, --max_length, --loss, ...) is passed through.
"""

import argparse
import dataclasses
import random
import time

import torch

import focalpo

SHAPES = {  # (config class name, overrides of its defaults)
    "tiny": ("LlamaConfig", dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True, max_position_embeddings=32768)),
    "mistral-7b": ("MistralConfig", {}),  # MistralConfig()'s defaults are Mistral-7B's shape (7.24B parameters)
    "llama-3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       rope_theta=500000.0, max_position_embeddings=8192)),
}


class PerParameterAdamWSR(torch.optim.Optimizer):
    """focalpo.AdamWSR as it was before it was bucketed: a Python loop over parameters, a dozen small ops and one
    .item() each, one torch.randint per rounding. Kept as the baseline that --optimizer times the new one against,
    and as the reference the tests compare it with. noise(x, k) gives the 16-bit rounding noise of rounding k
    (0: weight, 1: first moment, 2: second moment); a test can replace it to feed both versions the same bits."""

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def noise(self, p, x, k):
        return torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                w = p.float().mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                w.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
                for k, (dst, x) in enumerate(((p, w), (state["exp_avg"], m), (state["exp_avg_sq"], v))):
                    dst.copy_(focalpo.stochastic_round_bf16(x, self.noise(p, x, k)) if dst.dtype == torch.bfloat16 else x)


def random_pairs(n, vocab_size, max_length, max_prompt_length, seed):
    """n pairs of seeded random token ids: one prompt, two responses, cut like real data (prompt end kept)."""
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(3, vocab_size, (rng.randint(64, 512),), generator=g, dtype=torch.int32)
        prompt = prompt[-max_prompt_length:]
        seqs = []
        for _ in range(2):
            response = torch.randint(3, vocab_size, (rng.randint(32, 512),), generator=g, dtype=torch.int32)
            seqs.append(torch.cat([prompt, response])[:max_length])
        pairs.append(focalpo.Pair(i, seqs[0], len(prompt), seqs[1], len(prompt), row=i))
    return pairs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the GPU's dense bf16 peak for MFU; 0 = 989 on an H100/H200, none elsewhere")
    args, rest = parser.parse_known_args(argv)
    cfg = focalpo.parse_args(["--loss=focalpo", "--progress=false", "--lr=1e-6"] + rest)
    loss_type = focalpo.loss_types(cfg)[0]
    device = focalpo.pick_device(cfg)
    import transformers
    cls_name, overrides = SHAPES[args.shape]
    torch.manual_seed(cfg.seed)
    config = getattr(transformers, cls_name)(**overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                          dtype=focalpo.weights_dtype(cfg))
    model = focalpo.prepare_model(model, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())

    n_pairs = cfg.batch_size * cfg.grad_accum * (args.warmup + args.steps)
    pairs = random_pairs(n_pairs, config.vocab_size, cfg.max_length, cfg.max_prompt_length, cfg.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.time()
    ref = focalpo.compute_reference(model, pairs, cfg, 0, device)
    sync()
    ref_seconds = time.time() - t0

    model.train()
    optimizer = focalpo.make_optimizer(model, cfg, cfg.lr, device)
    batches = focalpo.length_grouped_batches(pairs, cfg.batch_size, cfg.seed)
    steps = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = padded = 0
    for i, step in enumerate(steps):
        micro = [focalpo.collate(b, 0) for b in step]
        if i == args.warmup:
            sync()
            t0 = time.time()
        focalpo.train_step(model, optimizer, micro, ref, cfg, loss_type, device)
        if i >= args.warmup:
            tokens += sum(int(b["attention_mask"].sum()) for b in micro)
            padded += sum(b["attention_mask"].numel() for b in micro)
    sync()
    seconds = time.time() - t0
    tok_s = tokens / seconds
    peak = args.peak_tflops * 1e12
    if not peak and device.type == "cuda" and any(k in torch.cuda.get_device_name() for k in ("H100", "H200")):
        peak = 989e12  # H100/H200 SXM dense bf16
    print(f"shape {args.shape}: {n_params / 1e6:,.1f}M parameters, weights {cfg.weights}, "
          f"gradient checkpointing {cfg.gradient_checkpointing}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"batch {cfg.batch_size} pairs x accum {cfg.grad_accum}, max_length {cfg.max_length}, loss {loss_type}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"tokens/s {tok_s:,.0f} (non-pad)   step {seconds / args.steps:.3f} s   padding {1 - tokens / padded:.1%}")
    print(f"MFU {6 * n_params * tok_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (6N per token)" if peak else "MFU n/a (no --peak_tflops)")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    print(f"reference pass {ref_seconds:.2f} s for {len(pairs)} pairs")
    return {"tokens_per_second": tok_s, "padding": 1 - tokens / padded, "ref_seconds": ref_seconds}


if __name__ == "__main__":
    try:
        main()
    except focalpo.FocalpoError as e:
        raise SystemExit(f"error: {e}")
