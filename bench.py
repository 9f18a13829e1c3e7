"""
Benchmark focalpo's real training step on random-init models of named shapes (no download, no dataset), or on a
real model and real pairs (--model and --dataset, as focalpo.py takes them).

    python bench.py --shape=tiny                                        # one row: CPU smoke test, seconds
    python bench.py --model=path/to/model.gguf --dataset=pairs.jsonl --max_length=160 --max_prompt_length=128
    python bench.py --shape=mistral-7b --weights=bf16 --gradient_checkpointing=true --batch_size=8 --grad_accum=2
    python bench.py --trl --shape=qwen2.5-0.5b --batch_size=8 --grad_accum=2   # the same pairs through TRL
    python bench.py --suite --out=bench_suite.json                      # the GPU results table, one process per row

One row: pairs are seeded random token ids of variable length (prompts 64-512 tokens, responses 32-512, cut to
--max_length the way focalpo cuts real data). It times the reference pass, then --warmup untimed and --steps timed
calls of focalpo.train_step, and reports tokens/s (non-pad tokens of chosen + rejected), MFU (6·N FLOPs per token,
N = all parameters, against --peak_tflops), peak GPU memory beside focalpo's memory plan, the padding fraction, the
reference pass's tokens/s, the optimizer step's share of the step time (timed with a device sync around it) and
the time to save one checkpoint. Any other focalpo option (--weights, --gradient_checkpointing, --batch_size,
--grad_accum, --max_length, --loss, ...) is passed through.

--trl: the same pairs, batch, accumulation, checkpointing and bf16 autocast through TRL's DPOTrainer with
precomputed reference log-probs (needs `pip install trl`; only fp32 master weights, as TRL has no bf16-weight
AdamW). Its own tokenization is skipped: the pairs are token ids already. A real model runs in TRL as it loads
(its own attention). The row also holds step 0 both ways: the largest difference between TRL's reference log-probs
of the pairs and focalpo's, and the first batch's DPO loss by each.
"""

import argparse
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import focalpo

SHAPES = {  # (config class name, overrides of its defaults)
    "tiny": ("LlamaConfig", dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)),
    "50m": ("LlamaConfig", dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                                num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True, max_position_embeddings=32768)),
    "mistral-7b": ("MistralConfig", {}),  # MistralConfig()'s defaults are Mistral-7B's shape (7.24B parameters)
    "llama-3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       rope_theta=500000.0, max_position_embeddings=8192)),
}

# The GPU results table (the README gets it once it is measured on a GPU): (label, options). --suite --shape=X runs every row on shape X instead (the CPU smoke test).
SUITE = [
    ("focalpo", ["--shape=qwen2.5-0.5b", "--weights=fp32", "--gradient_checkpointing=false"]),
    ("focalpo", ["--shape=qwen2.5-0.5b", "--weights=fp32", "--gradient_checkpointing=true"]),
    ("focalpo", ["--shape=qwen2.5-0.5b", "--weights=bf16", "--gradient_checkpointing=false"]),
    ("focalpo", ["--shape=qwen2.5-0.5b", "--weights=bf16", "--gradient_checkpointing=true"]),
    ("trl", ["--trl", "--shape=qwen2.5-0.5b", "--weights=fp32", "--gradient_checkpointing=false"]),
    ("trl", ["--trl", "--shape=qwen2.5-0.5b", "--weights=fp32", "--gradient_checkpointing=true"]),
    ("focalpo", ["--shape=mistral-7b", "--weights=bf16", "--gradient_checkpointing=true", "--steps=4"]),
    ("focalpo", ["--shape=llama-3-8b", "--weights=bf16", "--gradient_checkpointing=true", "--steps=4"]),
]
SUITE_COMMON = ["--batch_size=8", "--grad_accum=2", "--max_length=1024", "--max_prompt_length=512"]


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
        pairs.append(focalpo.Pair(i, seqs[0], len(prompt), seqs[1], len(prompt), f"bench pair {i}"))
    return pairs


def build(shape, cfg, device):
    """The shape's config and a random-init model made directly on the device (a 7B model initialised on the CPU
    takes minutes), prepared as focalpo prepares any model."""
    import transformers
    cls_name, overrides = SHAPES[shape]
    config = getattr(transformers, cls_name)(**overrides)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                              dtype=focalpo.weights_dtype(cfg))
    return config, focalpo.prepare_model(model, cfg, device)


def setup(args, cfg, device, prepare=True):
    """(config, model, pairs, pad id): a named shape and seeded random pairs, or --model (a folder, a hub name, a
    .gguf file) and the training pairs of --dataset, repeated to fill the steps. prepare: as focalpo trains it."""
    n = cfg.batch_size * cfg.grad_accum * (args.warmup + args.steps)
    if cfg.model == "demo":
        config, model = build(args.shape, cfg, device)
        return config, model, random_pairs(n, config.vocab_size, cfg.max_length, cfg.max_prompt_length, cfg.seed), 0
    tok = focalpo.load_tokenizer(cfg)
    train, _ = focalpo.prepare_data(cfg, tok, log=lambda msg: None)
    pairs = [dataclasses_replace(train[i % len(train)], idx=i) for i in range(n)]
    model = focalpo.load_model(cfg, tok).to(device)
    model = focalpo.prepare_model(model, cfg, device) if prepare else model.eval()
    return model.config, model, pairs, tok.pad_token_id


def peak_flops(args, device):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda" and any(k in torch.cuda.get_device_name() for k in ("H100", "H200")):
        return 989e12  # H100/H200 SXM dense bf16
    return 0.0


def measure(args, cfg, device):
    """One row: the reference pass, then timed train_step calls, then one checkpoint save."""
    config, model, pairs, pad = setup(args, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    ref = focalpo.pair_logps(model, focalpo.scoring_batches(pairs, cfg.batch_size, pad), len(pairs), device)
    sync()
    ref_seconds = time.perf_counter() - t0
    all_tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)

    model.train()
    optimizer = focalpo.make_optimizer(model, cfg, cfg.lr, device)
    optimizer_seconds, real_step = [0.0], optimizer.step
    def timed_step():  # the guard in train_step has just waited for the device, so the first sync is free
        sync()
        t = time.perf_counter()
        real_step()
        sync()
        optimizer_seconds[0] += time.perf_counter() - t
    optimizer.step = timed_step
    batches = focalpo.fast.length_grouped_batches(pairs, cfg.batch_size, cfg.seed)
    steps = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = padded = 0
    for i, step in enumerate(steps):
        micro = [focalpo.collate(b, pad) for b in step]
        if i == args.warmup:
            sync()
            t0, optimizer_seconds[0] = time.perf_counter(), 0.0
        _, applied = focalpo.train_step(model, optimizer, micro, ref, cfg, focalpo.loss_types(cfg)[0], device)
        assert applied, f"step {i}: a NaN/inf loss or gradient"
        if i >= args.warmup:
            tokens += sum(int(b["attention_mask"].sum()) for b in micro)
            padded += sum(b["attention_mask"].numel() for b in micro)
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / focalpo.GiB if device.type == "cuda" else None
    save_seconds = save_bytes = None
    if args.save:
        where = tempfile.mkdtemp(dir=args.save_dir or None)
        t = time.perf_counter()
        path = focalpo.RunFolder(where, model, optimizer, cfg, "focalpo", 1).save({"step": 1, "window": {}}, keep=1)
        save_seconds, save_bytes = time.perf_counter() - t, os.path.getsize(path)
        shutil.rmtree(where)
    tok_s = tokens / seconds
    flops = peak_flops(args, device)
    return {"impl": "focalpo", "shape": shape_name(args, cfg), "params": n_params, "weights": cfg.weights,
            "gradient_checkpointing": cfg.gradient_checkpointing, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "max_length": cfg.max_length, "steps": args.steps,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "tokens": tokens, "fast_logps": model.fast_logps,
            "tokens_per_second": tok_s, "step_seconds": seconds / args.steps, "padding": 1 - tokens / padded,
            "mfu": 6 * n_params * tok_s / flops if flops else None, "peak_gib": peak,
            "planned_gib": focalpo.checks.memory_plan(config, cfg)[0] / focalpo.GiB,
            "ref_tokens_per_second": all_tokens / ref_seconds, "optimizer_share": optimizer_seconds[0] / seconds,
            "save_seconds": save_seconds, "save_gib": save_bytes / focalpo.GiB if save_bytes else None}


# -----------------------------------------------------------------------------
# TRL's DPOTrainer on the same pairs (optional: only when trl is installed)


def measure_trl(args, cfg, device):
    try:
        import datasets
        import trl
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        from tokenizers import Tokenizer, models
    except ImportError as e:
        return {"impl": "trl", "shape": args.shape, "error": f"trl not installed ({e.name})"}
    if cfg.weights != "fp32":
        return {"impl": "trl", "shape": args.shape, "error": "TRL is timed with fp32 master weights only"}
    import warnings
    import transformers
    import datasets.utils.logging
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()

    class PreTokenized(trl.DPOTrainer):
        """DPOTrainer on pairs that are token ids already (its _prepare_dataset would tokenize text)."""
        def _prepare_dataset(self, dataset, *a, **kw):
            return dataset

    plain = dataclasses_replace(cfg, weights="fp32", gradient_checkpointing=False)
    # a real model runs in TRL as it loads (its own attention); a named shape as focalpo's build() makes it
    config, model, pairs, pad = setup(args, plain, device, prepare=cfg.model == "demo")
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    rows = [{"prompt_ids": p.chosen[:p.chosen_start].tolist(), "chosen_ids": p.chosen[p.chosen_start:].tolist(),
             "rejected_ids": p.rejected[p.rejected_start:].tolist()} for p in pairs]
    tok = focalpo.load_tokenizer(cfg) if cfg.model != "demo" else PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # focalpo's own numbers for the same pairs at step 0, from a copy of the model prepared as focalpo trains it
    mine = focalpo.prepare_model(copy.deepcopy(model), plain, device)
    mine_ref = focalpo.pair_logps(mine, focalpo.scoring_batches(pairs, cfg.batch_size, pad), len(pairs), device)
    first = focalpo.collate(pairs[:cfg.batch_size], pad)
    with torch.no_grad():
        mine_loss, _ = focalpo.forward_pairs(mine.train(), first, mine_ref, cfg, "dpo", device)
    del mine
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                sync()
                marks[state.global_step] = time.perf_counter()
                if state.global_step == args.warmup and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

    counted = []  # non-pad tokens of each micro-batch, in the order the collator made them
    collator = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=pad, max_length=cfg.max_length)
    def counting_collator(examples):
        batch = collator(examples)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    out_dir = tempfile.mkdtemp()
    dpo_args = trl.DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_steps=args.warmup + args.steps, learning_rate=cfg.lr, lr_scheduler_type="constant", beta=cfg.beta,
        max_grad_norm=cfg.grad_clip, max_length=cfg.max_length, precompute_ref_log_probs=True,
        precompute_ref_batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=device.type == "cuda",
        use_cpu=device.type == "cpu", optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        adam_beta2=0.95, warmup_steps=0, logging_steps=10 ** 6, save_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True)
    dataset = datasets.Dataset.from_list(rows)
    t0 = time.perf_counter()  # setting up includes the reference pass over the pairs (precompute_ref_log_probs)
    trainer = PreTokenized(model=model, args=dpo_args, train_dataset=dataset, processing_class=tok,
                           data_collator=counting_collator, callbacks=[Clock()])
    trainer.get_train_dataloader()
    sync()
    ref_seconds = time.perf_counter() - t0
    # step 0 both ways: TRL's reference log-probs of every pair against focalpo's, and the loss of the first batch
    ds = trainer.train_dataset
    theirs_ref = torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]], dtype=torch.float64).T
    with torch.no_grad():
        theirs_loss = float(trainer.compute_loss(model, trainer._prepare_inputs(collator([ds[i] for i in
                                                                                          range(cfg.batch_size)]))))
    step0 = {"step0_logps_max_abs_diff": float((theirs_ref - mine_ref).abs().max()),
             "step0_logps_mean": float(mine_ref.mean()), "step0_loss_trl": theirs_loss,
             "step0_loss_focalpo": float(mine_loss.mean())}
    model.train()
    counted.clear()
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds = marks[args.warmup + args.steps] - marks[args.warmup]
    tokens = sum(counted[-args.steps * cfg.grad_accum:])  # the timed steps' micro-batches are the last ones
    tok_s = tokens / seconds
    flops = peak_flops(args, device)
    return {"impl": "trl", "trl_version": trl.__version__, "shape": shape_name(args, cfg), "params": n_params, **step0,
            "weights": "fp32", "gradient_checkpointing": cfg.gradient_checkpointing, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "max_length": cfg.max_length, "steps": args.steps,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "tokens_per_second": tok_s, "step_seconds": seconds / args.steps,
            "mfu": 6 * n_params * tok_s / flops if flops else None,
            "peak_gib": torch.cuda.max_memory_allocated() / focalpo.GiB if device.type == "cuda" else None,
            "ref_tokens_per_second": sum(len(p.chosen) + len(p.rejected) for p in pairs) / ref_seconds}


def shape_name(args, cfg):
    return args.shape if cfg.model == "demo" else os.path.basename(cfg.model.rstrip("/"))


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


# -----------------------------------------------------------------------------
# --suite: every row of the GPU results table, each in its own process (an out-of-memory row does not stop the rest)


def run_row(options, timeout):
    """One `python bench.py ...` process; its JSON row, or an error row."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *options, f"--json={path}"],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0:
            with open(path) as f:
                return json.load(f)
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {r.returncode}: {last[:200]}"}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    finally:
        os.remove(path)


def suite_table(rows):
    """Markdown: one line per row, and for TRL rows the focalpo/TRL speed ratio at the same settings."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    lines = ["| impl | shape | weights | ckpt | batch x accum | tokens/s | MFU | peak GiB (plan) | ref tokens/s "
             "| optimizer share | save s (GiB) | focalpo / TRL |", "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('impl', '?')} | {r.get('shape', '?')} | {' '.join(r.get('options', []))} "
                         f"| | | error: {r['error']} | | | | | | |")
            continue
        ratio = "-"
        if r["impl"] == "trl":
            mine = [m for m in rows if m.get("impl") == "focalpo" and "error" not in m and m["shape"] == r["shape"]
                    and m["weights"] == "fp32" and m["gradient_checkpointing"] == r["gradient_checkpointing"]]
            ratio = f"{mine[0]['tokens_per_second'] / r['tokens_per_second']:.2f}x" if mine else "-"
        peak = fmt(r.get("peak_gib"), ".1f") + (f" ({r['planned_gib']:.1f})" if r.get("planned_gib") else "")
        save = fmt(r.get("save_seconds"), ".1f") + (f" ({r['save_gib']:.1f})" if r.get("save_gib") else "")
        lines.append(f"| {r['impl']} | {r['shape']} | {r['weights']} | {'on' if r['gradient_checkpointing'] else 'off'} "
                     f"| {r['batch_size']} x {r['grad_accum']} | {r['tokens_per_second']:,.0f} "
                     f"| {fmt(r.get('mfu'), '.1%')} | {peak} | {fmt(r.get('ref_tokens_per_second'), ',.0f')} "
                     f"| {fmt(r.get('optimizer_share'), '.1%')} | {save} | {ratio} |")
    return "\n".join(lines)


def run_suite(args, rest):
    rows = []
    for impl, options in SUITE:
        options = options + SUITE_COMMON + rest
        if args.shape != "suite":
            options = [o for o in options if not o.startswith("--shape=")] + [f"--shape={args.shape}"]
        t = time.perf_counter()
        row = run_row(options, args.row_timeout)
        row.setdefault("impl", impl)
        row.update(options=options, wall_seconds=time.perf_counter() - t)
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = suite_table(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES) + ["suite"], default=None,
                        help="model shape (default: tiny; with --suite: each row's own shape)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 2)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the GPU's dense bf16 peak for MFU; 0 = 989 on an H100/H200, none elsewhere")
    parser.add_argument("--save", type=focalpo.cli.parse_bool, default=None, help="time saving one checkpoint (default true)")
    parser.add_argument("--save_dir", default="", help="where the timed checkpoint is written (and deleted)")
    parser.add_argument("--json", default="", help="also write the row as JSON here")
    parser.add_argument("--trl", action="store_true", help="time TRL's DPOTrainer instead of focalpo")
    parser.add_argument("--suite", action="store_true", help="run every row of the GPU results table")
    parser.add_argument("--row_timeout", type=int, default=240, help="seconds per suite row")
    parser.add_argument("--out", default="", help="with --suite: write all rows as JSON here")
    args, rest = parser.parse_known_args(argv)
    if args.suite:  # the rows get these options only where given, after their own (so these win)
        args.shape = args.shape or "suite"
        given = [f"--{k}={v}" for k, v in (("steps", args.steps), ("warmup", args.warmup), ("save", args.save))
                 if v is not None]
        return run_suite(args, rest + given)
    args.steps, args.warmup = args.steps or 5, 2 if args.warmup is None else args.warmup
    args.save = True if args.save is None else args.save
    args.shape = args.shape or "tiny"
    cfg = focalpo.cli.parse_args(["--loss=focalpo", "--progress=false", "--lr=1e-6"] + rest)
    device = focalpo.procs.pick_device()
    row = (measure_trl if args.trl else measure)(args, cfg, device)
    print(f"{row['impl']}: {row['error']}" if "error" in row else json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f)
    return row


if __name__ == "__main__":
    try:
        main()
    except focalpo.FocalpoError as e:
        raise SystemExit(f"error: {e}")
