"""
focalpo: preference optimisation beyond DPO, in one readable file.

Trains a Hugging Face causal LM on preference pairs (prompt, chosen, rejected) with one of three losses:
    DPO       Rafailov et al. 2023, arXiv 2305.18290
    FocalPO   Liu et al. 2025,      arXiv 2501.06645
    MinorDPO  Xie et al. 2024,      arXiv 2408.09834

    python focalpo.py        # the demo: offline, a tiny model built from a config, about a minute on 2 CPU cores
    python focalpo.py --model=Qwen/Qwen2.5-0.5B-Instruct --dataset=trl-lib/ultrafeedback_binarized --loss=focalpo
    python focalpo.py --model=path/to/model --dataset=pairs.jsonl --eval_dataset=heldout.jsonl
    torchrun --nproc_per_node=8 focalpo.py --model=... --dataset=... --grad_accum=8    # several GPUs (FSDP2)
    python focalpo.py --help # every option, explained

Reading guide: the core, in reading order
    Config           every option on one line, with what it means
    Losses           preference_loss: DPO, FocalPO, MinorDPO on per-pair log-probs (derived in tutorial.ipynb)
    Log-probs        sequence_logps: summed response-token log-probs (fp32 log-softmax, float64 sums)
    Reference cache  one no-grad pass with the initial weights, cached under a hash of everything that changes it
    Data             the demo task, the row formats, tokenization with an explicit response mask, batches
    Model            loading, dropout off, attention without a mask
    One step         metrics, train_step (gradient accumulation), evaluate
    Training         train(): schedule, step, log, evaluate, save
    The whole job    run(): data, model, reference, then each loss from the same weights; main()
    Processes        the few helpers the core calls for several processes: with one, each is a no-op
A first reading can stop at the line "# Appendix: optional machinery". After it: the command line and the options
check, data files and the hub, the demo's SFT stage and generation accuracy, the memory plan, AdamW for bf16
weights, checkpoints and resume, fault handling, several processes (FSDP2).

Conventions (the reference implementations disagree on all three, so we say it here):
  - log π(y|x) is the SUM of the response tokens' log-probs (not the mean), as in the DPO paper.
  - rewards are β·(log πθ − log π_ref), i.e. they include β, and are detached (for logging only).
  - reward accuracy counts a tie (r_w == r_l) as half right, so it reads exactly 0.5 at step 0, where the policy
    equals the reference and every pair is a tie. Ranking accuracy (Chen et al. 2024) counts ties as right (≥).

Pitfalls of DPO implementations guarded against here, cited below as "pitfall N" (the README's "Pitfalls" section
names the public bug reports behind each and the tests that check it):
   1. A token merging across the prompt/response boundary: tokenize prompt+response as one string, check the prefix.
   2. A doubled or missing BOS: decided once per tokenizer, never by a chat template and add_special_tokens both.
   3. A doubled EOS on chat data: chat templates close the turn; EOS is appended to plain-text responses only.
   4. pad == EOS masking out the real EOS: an explicit response mask, never `ids != pad`.
   5. A log-prob mask off by one: the logits at position t predict token t+1.
   6. Left padding in training: right padding, so positions are right without position ids.
   7. A low-precision log-softmax: fp32 (bf16 weights are fine, a bf16 softmax is not).
   8. Policy != reference at step 0: dropout off; the reference with the same weights, dtype and code path.
   9. A wrong reference cache: keyed on everything that changes it; held-out pairs scored by the initial model.
  10. Gradient accumulation that averages means: each micro-batch adds its summed loss / the pairs of the step.
  11. Truncation that empties a response: the prompt is cut first (keeping its end); emptied pairs are dropped.
  12. bf16 weights at DPO learning rates: round-to-nearest loses the update; stochastic rounding keeps it.
  13. Misread metrics: chosen rewards may fall (the margin is what grows); ties are counted as said above.
"""

import argparse
import collections
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Config: every default on one line; override any of them as --key=value


@dataclass
class Config:
    # model and data
    model: str = "demo"  # "demo" (tiny model built from a config, offline), a hub name, or a local path
    revision: str = "main"  # hub revision (branch, tag or commit) of --model
    dataset: str = "demo"  # "demo" (sorting task made in code), a hub name, or .jsonl/.json/.csv/.parquet file(s), comma-separated
    split: str = ""  # hub split to train on; "" = "train", else "train_prefs"
    eval_dataset: str = ""  # held-out file(s), whatever --dataset is; "" = its test split if it has one, else a seeded fraction
    eval_split: str = ""  # hub split to evaluate on; "" = "test", else "test_prefs", else a seeded fraction
    eval_fraction: float = 0.05  # fraction of pairs held out when there is no test split
    max_train_pairs: int = 0  # use at most this many training pairs (0 = all)
    max_eval_pairs: int = 500  # evaluate on at most this many held-out pairs (0 = all)
    max_length: int = 1024  # prompt + response tokens, per sequence
    max_prompt_length: int = 512  # prompts longer than this keep their last tokens
    sft_steps: int = 80  # demo only: next-token training on correct sortings first, so the reference knows something
    # loss
    loss: str = "dpo,focalpo,minordpo"  # one loss or a comma-separated list, each trained from the same start
    beta: float = 0.1  # β: inverse temperature of the implicit reward; larger = stay closer to the reference
    gamma: float = 0.05  # FocalPO's γ (γ = 0 is DPO). 0.05 is THIS PROJECT's default, not a value from the paper
    focal_detach: bool = False  # FocalPO variant: p^γ a constant weight (gradient weight p^γ(1-p), never negative)
    # optimisation
    lr: float = 0.0  # peak learning rate; 0 = auto: 3e-4 for the demo, 5e-7 for any other model (the DPO reference code's default; the paper used 1e-6 with RMSprop)
    batch_size: int = 8  # pairs per micro-batch (each pair is two sequences, so 2x this many rows per forward)
    grad_accum: int = 2  # micro-batches per optimizer step: effective batch = batch_size * grad_accum pairs
    epochs: int = 1  # passes over the training pairs
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    warmup_ratio: float = 0.1  # fraction of steps with a linear warm-up from 0
    schedule: str = "cosine"  # learning-rate decay after warm-up: "cosine" or "linear" (both end at 0)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    gradient_checkpointing: bool = False  # recompute activations in backward: much less memory, ~30% slower
    weights: str = "fp32"  # "fp32" (bf16 autocast on CUDA), or "bf16": half the memory, AdamW with stochastic rounding
    # run
    seed: int = 1337  # seeds model init (demo), data split, shuffling
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu" or "cuda"
    eval_every: int = 25  # evaluate every this many optimizer steps (and at the start and the end)
    log_every: int = 5  # write a line to metrics.jsonl every this many optimizer steps
    out_dir: str = "out"  # metrics, summary and the trained model go here (out_dir/<loss>/ when several losses)
    cache_dir: str = "ref_cache"  # reference log-prob caches, one file per (model, weights, data, lengths, dtype)
    save_model: bool = True  # save the trained model and tokenizer with save_pretrained at the end
    save_every: int = 100  # write a checkpoint every this many optimizer steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # keep the last this many checkpoints of the run (older ones are deleted)
    keep_final_checkpoint: bool = False  # keep the checkpoints of a finished run (by default only model and summary stay)
    resume: bool = False  # continue the run in out_dir from its newest good checkpoint (finished losses: shown, not rerun)
    max_bad_steps: int = 3  # stop after this many consecutive steps with a non-finite loss or gradient
    dist_timeout: int = 900  # several processes: seconds a collective may wait before the run stops with an error
    progress: bool = True  # show a tqdm progress bar
    generate: int = -1  # at the end, print this many held-out prompts with greedy completions (-1: 5 demo, 0 other)
    max_new_tokens: int = 128  # --generate: at most this many new tokens per completion


LOSSES = ("dpo", "focalpo", "minordpo")


class FocalpoError(Exception):
    """A problem the user can fix: main() prints it as one sentence, without a traceback."""


class Interrupted(FocalpoError):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved and the run can be resumed."""


def loss_types(cfg):
    return [l.strip() for l in cfg.loss.split(",") if l.strip()]


def peak_lr(cfg):
    return cfg.lr or (3e-4 if cfg.model == "demo" else 5e-7)


def weights_dtype(cfg):
    return torch.bfloat16 if cfg.weights == "bf16" else torch.float32


# -----------------------------------------------------------------------------
# Losses: pure functions of per-pair summed log-probs, each (B,). Derived and checked in tutorial.ipynb, sections 1-4


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    loss_type="dpo", beta=0.1, gamma=0.05, focal_detach=False):
    """Per-pair losses (B,), chosen rewards (B,) and rejected rewards (B,), rewards detached.

    r_w = log πθ(y_w|x) − log π_ref(y_w|x),  r_l = the same for y_l,  h = r_w − r_l,  p = σ(βh).
      dpo:      L = −log σ(βh)                          Eq. 7 of arXiv 2305.18290
      focalpo:  L = −p^γ · log p                        arXiv 2501.06645; gradient flows through p^γ too
                (focal_detach=True: p^γ is a constant weight, a variant found in third-party code)
      minordpo: L = −log σ(β(r_w − max(0, r_l)))       arXiv 2408.09834; y_l pushed down only while r_l > 0
    gamma and focal_detach are used by focalpo only (γ = 0 gives DPO exactly, detached or not).
    """
    r_w = policy_chosen_logps - ref_chosen_logps  # (B,)
    r_l = policy_rejected_logps - ref_rejected_logps  # (B,)
    if loss_type == "dpo":
        losses = -F.logsigmoid(beta * (r_w - r_l))
    elif loss_type == "focalpo":
        log_p = F.logsigmoid(beta * (r_w - r_l))  # log p, stable for any βh
        focal = torch.exp(gamma * log_p)  # p^γ computed as exp(γ log p): no under/overflow
        losses = -(focal.detach() if focal_detach else focal) * log_p
    elif loss_type == "minordpo":
        # torch.where, not clamp: at r_l = 0 (every pair at step 0) the rejected branch has zero gradient, 1[r_l > 0]
        r_l_pos = torch.where(r_l > 0, r_l, torch.zeros_like(r_l))
        losses = -F.logsigmoid(beta * (r_w - r_l_pos))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSSES}")
    return losses, beta * r_w.detach(), beta * r_l.detach()


# -----------------------------------------------------------------------------
# Log-probs: summed over response tokens, computed only where the response mask is on (pitfalls 5, 7)


def _token_logps(lm_head, hidden, targets):
    """log π(target | prefix) for N positions: lm_head on (N, H) hidden states, log-softmax in fp32."""
    logits = lm_head(hidden).float()  # (N, V)
    return -F.cross_entropy(logits, targets, reduction="none")  # (N,)


def sequence_logps(model, batch, chunk_size=2048):
    """Summed response-token log-probs per row, (2B,) float64, and the number of response tokens per row, (2B,).

    Logits at position t predict token t+1, so position t counts when token t+1 is a response token (collate lists
    those positions). Only they reach the output layer, in chunks of `chunk_size`, each recomputed in backward
    (checkpoint) so that no (N, vocab) fp32 tensor outlives its chunk. Each token's log-prob is fp32; their sum per
    row is float64: an fp32 sum over thousands of tokens drifts by many of its units in the last place, and DPO
    subtracts such sums from each other.
    """
    # No attention mask, on purpose: with right padding every real token comes before every pad, so causal attention
    # alone keeps scored positions from seeing pads (pads' own outputs are never scored), and position ids are
    # 0..T-1 either way. Passing the mask would make transformers test it on the host every forward (a GPU wait)
    # and keep SDPA off its fastest causal kernels (use_causal_sdpa). test_sequence_logps_match_naive_loop... checks
    # the values. A model with a sliding window shorter than --max_length keeps the mask.
    mask = None if model.config._attn_implementation == "causal_sdpa" else batch["attention_mask"]
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=mask)
    hidden = out.last_hidden_state  # (2B, T, H)
    positions = batch["positions"]  # (N,) flat indices into (2B * T)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, H)
    targets = batch["input_ids"].view(-1).index_select(0, positions + 1)  # (N,) the token each position predicts
    lm_head = model.get_output_embeddings()
    pieces = []
    for i in range(0, h.shape[0], chunk_size):
        args = (lm_head, h[i:i + chunk_size], targets[i:i + chunk_size])
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _token_logps(*args))
    token_logps = torch.cat(pieces)  # (N,)
    logps = torch.zeros(hidden.shape[0], device=h.device, dtype=torch.float64)
    return logps.index_add(0, batch["position_seq"], token_logps.double()), batch["n_tokens"]  # (2B,), (2B,)


def to_device(batch, device):
    """Host batch -> device (its tensors; a flag passes as it is). On CUDA through pinned memory, so the copy is
    queued without making the CPU wait."""
    cuda = device.type == "cuda"
    move = lambda v: v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)
    return {k: move(v) if torch.is_tensor(v) else v for k, v in batch.items()}


# -----------------------------------------------------------------------------
# Reference log-prob cache: one no-grad pass with the initial weights; the reference model is never kept (pitfall 9)


def weights_fingerprint(model):
    """A cheap digest of the weights: two sums per tensor. Enough to tell one checkpoint from another."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()  # FSDP: gather the shards
            x = x.float()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{x.sum().item():.9e}{x.abs().sum().item():.9e}".encode())
    return h.hexdigest()[:16]


def fields_key(fields):
    """A cache file's key: a hash of everything that changes what it holds."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def cache_key(cfg, model, train_pairs, eval_pairs, device):
    """Everything that changes the cached values: model, its weights, the exact token ids and masks of every pair
    (so dataset, split, tokenizer, chat template and max lengths), and the dtype / device kind of the forward."""
    data = hashlib.sha256()
    for pairs in (train_pairs, eval_pairs):
        for p in pairs:
            data.update(p.chosen.numpy().tobytes() + p.rejected.numpy().tobytes())
            data.update(f"{p.chosen_start},{p.rejected_start};".encode())
        data.update(b"|")
    fields = {"model": cfg.model, "revision": cfg.revision, "weights": weights_fingerprint(model),
              "data": data.hexdigest()[:16], "n_train": len(train_pairs), "n_eval": len(eval_pairs),
              "compute": f"{device.type}/{next(model.parameters()).dtype}/{'bf16-autocast' if device.type == 'cuda' else 'no-autocast'}",
              "version": 3}  # 3: float64 sums
    return fields_key(fields), fields


@torch.no_grad()
def compute_reference(model, pairs, cfg, pad_id, device):
    """(N, 2) float64: log π_ref(y_w|x), log π_ref(y_l|x) per pair, with the same code path as the policy's forward."""
    ref = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    model.eval()
    batches = length_grouped_batches(pairs, cfg.batch_size, cfg.seed, shuffle=False)
    for chunk in my_share(batches):  # all the batches with one process; with several, each its share
        batch = collate(chunk or batches[0], pad_id)  # None: a stand-in forward, so every process runs as many
        with autocast(device):
            logps, _ = model_logps(model, to_device(batch, device))
        if chunk:
            ref[batch["idx"].to(device)] = logps.view(2, -1).T  # (B, 2): chosen, rejected
    reshard(model)
    return all_reduce(ref).cpu()  # each pair's row was filled by one process; one copy to the host at the end


def load_or_compute_reference(cfg, model, train_pairs, eval_pairs, pad_id, device, log=print):
    """Reference log-probs for train and eval pairs: loaded from cache_dir when the key matches, else computed
    and saved."""
    key, fields = cache_key(cfg, model, train_pairs, eval_pairs, device)
    path = os.path.join(cfg.cache_dir, f"ref_{key}.pt")
    cached = read_cache(path, key, "reference", log)
    if agree(cached is not None, device, "min"):  # with several processes: all of them found it
        return cached["train"], cached["eval"]
    t0 = time.time()
    train_ref = compute_reference(model, train_pairs, cfg, pad_id, device)
    eval_ref = compute_reference(model, eval_pairs, cfg, pad_id, device)
    if rank() == 0:
        write_cache(path, key, fields, {"train": train_ref, "eval": eval_ref})
    log(f"reference: computed log-probs of {len(train_pairs)}+{len(eval_pairs)} pairs in {time.time() - t0:.1f}s, "
        f"saved to {path}")
    return train_ref, eval_ref


# -----------------------------------------------------------------------------
# Data, the demo task: sort letters. Pairs are right vs wrong, or less wrong vs more wrong; the answers can be checked


DEMO_LETTERS = "abcdefghijklmnopqrstuvwxyz"
DEMO_PAIRS = 4400  # 4000 to train on, 400 held out


def demo_mistake(answer, letters, rng):
    """One plausible mistake in an answer: two neighbours swapped (spotted from the answer alone), or a letter
    replaced by one that is not in the prompt, then re-sorted (spotted only by looking back at the prompt)."""
    answer = list(answer)
    i = rng.randrange(len(answer) - 1)
    if rng.random() < 0.5:
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    else:
        answer[i] = rng.choice([c for c in DEMO_LETTERS if c not in letters and c not in answer])
        answer.sort()
    return answer


def make_demo_pairs(n, seed):
    """n pairs with distinct prompts, like {"prompt": "sort: q d m a =", "chosen": " a d m q", "rejected": " a m d q"}.

    Half are right vs wrong: the chosen answer is the sorted letters, the rejected one has one mistake. The other
    half are less wrong vs more wrong: the chosen answer has one mistake, the rejected one two (made independently).
    As in real preference data, the preferred response is often only the better of two imperfect ones, and a
    model's likelihood ranks such pairs right only part of the time."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < n:
        letters = rng.sample(DEMO_LETTERS, rng.randint(4, 8))
        if tuple(letters) in seen:
            continue
        seen.add(tuple(letters))
        good = sorted(letters)
        if rng.random() < 0.5:
            chosen, rejected = good, demo_mistake(good, letters, rng)
        else:
            chosen, rejected = demo_mistake(good, letters, rng), None
            while rejected is None or rejected in (chosen, good):  # two mistakes, not undoing each other
                rejected = demo_mistake(demo_mistake(good, letters, rng), letters, rng)
        pairs.append({"prompt": "sort: " + " ".join(letters) + " =",
                      "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)})
    return pairs


def demo_answer(prompt):
    """The right answer to a demo prompt ("sort: q d m a =" -> "a d m q"), from its letters."""
    return " ".join(sorted(w for w in prompt.split() if len(w) == 1 and w in DEMO_LETTERS))


# -----------------------------------------------------------------------------
# Data: rows, their format, and each row as (prompt text, prompt+chosen text, prompt+rejected text)


def load_rows(cfg):
    """(train rows, held-out rows, their format), each row a (dict, where it came from) tuple. Held out: the files
    of --eval_dataset, else the dataset's own test split, else a seeded fraction of the training rows. The format
    is the first row's, in the order the data was read (before any shuffle)."""
    if cfg.dataset == "demo":
        rows = [(r, f"demo pair {i}") for i, r in enumerate(make_demo_pairs(DEMO_PAIRS, cfg.seed), 1)]
        return rows[:4000], rows[4000:], "plain"
    if is_local_data(cfg.dataset):
        train, heldout = read_local_rows(cfg.dataset), None
    else:
        train, heldout = load_hub_splits(cfg.dataset, cfg.split, cfg.eval_split)
    if cfg.eval_dataset:
        heldout = read_local_rows(cfg.eval_dataset)
    fmt = detect_format(train)
    if heldout and detect_format(heldout) != fmt:
        raise FocalpoError(f"the training data is {fmt} ({train[0][1]}) but the held-out data is "
                           f"{detect_format(heldout)} ({heldout[0][1]}): use the same format for both")
    if heldout is None:  # hold out a seeded fraction
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, round(cfg.eval_fraction * len(train))) if len(train) > 1 else 0
        heldout, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    return train, heldout, fmt


ROLES = ("system", "user", "assistant", "tool")


def _is_messages(x):
    return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _check_messages(msgs, where):
    for m in msgs:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FocalpoError(f"{where}: each message needs a 'role' and a string 'content', found {m!r:.80}")
        if m["role"] not in ROLES:
            raise FocalpoError(f"{where}: unknown message role {m['role']!r} (expected one of {', '.join(ROLES)})")


def detect_format(rows):
    """'plain', 'chat' or 'implicit' (no prompt column: the prompt is the common start of chosen and rejected),
    from the first of the (row, where) tuples; render_plain and render_chat check that every row agrees."""
    if not rows:
        raise FocalpoError("the dataset is empty")
    first, where = rows[0]
    if not {"chosen", "rejected"} <= set(first):
        raise FocalpoError(f"{where}: expected columns 'chosen' and 'rejected' (and optionally 'prompt'), "
                           f"found: {', '.join(sorted(first)) or 'none'}")
    if _is_messages(first["chosen"]) or _is_messages(first.get("prompt")):
        return "chat"
    return "plain" if "prompt" in first else "implicit"


def _common_prefix_len(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def implicit_prompt(chosen, rejected):
    """Anthropic/hh-rlhf style: the prompt is the longest common prefix, cut back to the end of the last
    "Assistant:" turn marker in it (or, with no marker, to the last whitespace, so no word is split)."""
    prefix = chosen[:_common_prefix_len(chosen, rejected)]
    cut = prefix.rfind("Assistant:")
    if cut >= 0:
        return prefix[:cut + len("Assistant:")]
    cut = max(prefix.rfind(" "), prefix.rfind("\n"))
    return prefix[:cut + 1] if cut >= 0 else ""


def render_plain(row, fmt, where):
    """A plain-text row -> (prompt, prompt+chosen, prompt+rejected), or a str: the reason to skip it."""
    for name in ("chosen", "rejected") + (("prompt",) if fmt == "plain" else ()):
        if not isinstance(row.get(name), str):
            raise FocalpoError(f"{where}: {name!r} should be a string like the first row, found "
                               f"{type(row.get(name)).__name__} (mixed formats are not supported)")
    chosen, rejected = row["chosen"], row["rejected"]
    if fmt == "implicit":
        prompt = implicit_prompt(chosen, rejected)
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        prompt = row["prompt"]
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    if chosen == rejected:
        return "chosen == rejected"
    return prompt, prompt + chosen, prompt + rejected


def render_chat(row, tokenizer, where):
    """A conversational row -> the same three texts through the chat template, or a str: the reason to skip it."""
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    for name, x in (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if prompt is not None else ()):
        if not _is_messages(x):
            raise FocalpoError(f"{where}: {name!r} should be a list of {{role, content}} messages like the "
                               f"first row, found {type(x).__name__} (mixed formats are not supported)")
        _check_messages(x, f"{where} {name!r}")
    if prompt is None:  # prompt = the turns chosen and rejected share (trl-lib/ultrafeedback_binarized)
        prompt = chosen[:_common_prefix_len(chosen, rejected)]
    if chosen[:len(prompt)] == prompt:  # chosen/rejected may repeat the prompt turns: keep only what follows
        chosen = chosen[len(prompt):]
    if rejected[:len(prompt)] == prompt:
        rejected = rejected[len(prompt):]
    if not prompt:
        return "no prompt turns"
    if not chosen or not rejected or not all(m["content"].strip() for m in chosen + rejected):
        return "empty response"
    if chosen == rejected:
        return "chosen == rejected"
    text = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    return text(prompt, True), text(prompt + chosen, False), text(prompt + rejected, False)


# -----------------------------------------------------------------------------
# Tokenization (pitfalls 1-4, 6, 11): prompt+response tokenized as one string, prefix-checked, explicit mask


@dataclass
class Pair:
    idx: int  # position in its split; indexes the reference cache
    chosen: torch.Tensor  # (Tc,) int32 token ids, prompt then response
    chosen_start: int  # first response token of chosen
    rejected: torch.Tensor  # (Tr,)
    rejected_start: int
    where: str = ""  # the file (or split) and the line (or row) it came from, to name it in messages


def uses_bos(tokenizer):
    """Does this tokenizer put a BOS token in front when asked to add special tokens? (Llama, Mistral: yes; Qwen: no)"""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize_pairs(rows, fmt, tokenizer, cfg, stats):
    """(row, where) tuples -> list of Pair. Unusable rows are dropped and counted in `stats`, a Counter of reasons."""
    add_bos, bos, eos = uses_bos(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    if fmt == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise FocalpoError("the data is conversational but the tokenizer has no chat template: use an "
                           "instruct/chat model's tokenizer, or plain-text prompt/chosen/rejected data")
    if fmt != "chat" and eos is None:
        raise FocalpoError("the tokenizer has no EOS token, needed to end plain-text responses")
    rendered = []
    for row, where in rows:
        r = render_chat(row, tokenizer, where) if fmt == "chat" else render_plain(row, fmt, where)
        if isinstance(r, str):
            stats[r] += 1
        else:
            rendered.append((where, r))
    texts = [t for _, r in rendered for t in r]
    # add_special_tokens=False everywhere: BOS is decided once below, and a chat template that writes "<s>" in its
    # text already has it (pitfall 2)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    pairs = []
    for k, (where, _) in enumerate(rendered):
        prompt, seqs = ids[3 * k], ids[3 * k + 1: 3 * k + 3]
        if add_bos and (not prompt or prompt[0] != bos):
            prompt, seqs = [bos] + prompt, [[bos] + s for s in seqs]
        out, reason = [], None
        for full in seqs:
            n = _common_prefix_len(prompt, full)
            if n < len(prompt):  # a token merged across the prompt/response boundary (pitfall 1): the response
                stats["boundary token merged"] += 1  # starts where they part
            p, resp = full[:n], full[n:]
            if fmt != "chat":
                resp = resp + [eos]  # plain text: teach the model to stop; chat templates close the turn themselves
            if len(p) > cfg.max_prompt_length:  # keep the prompt's end (and its BOS) (pitfall 11)
                p = ([bos] if add_bos else []) + p[len(p) - cfg.max_prompt_length + add_bos:]
                stats["prompt truncated"] += 1
            if len(p) + len(resp) > cfg.max_length:
                resp = resp[:cfg.max_length - len(p)]
                stats["response truncated"] += 1
            if not p:
                reason = "empty prompt and no BOS token"
            elif not resp:
                reason = "empty response after tokenization"
            out.append((torch.tensor(p + resp, dtype=torch.int32), len(p)))
        if reason is None and torch.equal(out[0][0], out[1][0]):
            reason = "chosen == rejected after truncation"
        if reason:
            stats[reason] += 1
            continue
        pairs.append(Pair(len(pairs), out[0][0], out[0][1], out[1][0], out[1][1], where))
    return pairs


def prepare_data(cfg, tokenizer, log=print):
    """(train pairs, eval pairs) ready for training, with the reasons rows were dropped or cut in the log."""
    train_rows, eval_rows, fmt = load_rows(cfg)
    if cfg.max_train_pairs:
        train_rows = train_rows[:cfg.max_train_pairs]
    if cfg.max_eval_pairs:
        eval_rows = eval_rows[:cfg.max_eval_pairs]
    out = []
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        stats = collections.Counter()
        pairs = tokenize_pairs(rows, fmt, tokenizer, cfg, stats)
        notes = ", ".join(f"{v} {k}" for k, v in sorted(stats.items()))
        log(f"data: {name}: {len(pairs)} pairs from {len(rows)} rows ({fmt} format){'; ' + notes if notes else ''}")
        if not pairs:
            raise FocalpoError(f"no usable {name} pairs are left after filtering ({notes or 'no rows'}): "
                               f"check the data, or raise --max_length / --max_prompt_length")
        out.append(pairs)
    return out[0], out[1]


def collate_sequences(seqs, starts, pad_id):
    """Right-padded rows (pitfall 6), the explicit response mask (never from ids != pad: pitfall 4) and
    the positions whose logits are scored: position t predicts token t+1, so t counts when token t+1 is a response
    token. They are found here, on the host, so that the forward pass needs no nonzero() (a GPU -> CPU wait)."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (R, T)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (R, T)
    response_mask = torch.zeros((len(seqs), T), dtype=torch.bool)  # (R, T)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(s)] = s
        attention_mask[i, :len(s)] = 1
        response_mask[i, start:len(s)] = True
    scored = torch.zeros_like(response_mask)
    scored[:, :-1] = response_mask[:, 1:]  # (R, T)
    positions = scored.view(-1).nonzero()[:, 0]  # (N,) flat indices into (R * T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "positions": positions, "position_seq": positions // T, "n_tokens": scored.sum(1)}  # (N,), (N,), (R,)


def collate(pairs, pad_id):
    """B pairs -> one batch of 2B rows: the B chosen, then the B rejected, with each pair's index in its split."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs],
                              [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs], pad_id)
    return dict(batch, idx=torch.tensor([p.idx for p in pairs]))


def length_grouped_batches(pairs, batch_size, seed, shuffle=True):
    """Batches of similar length so padding stays small: shuffle, sort within windows of 64 batches by length,
    then shuffle the batches. With shuffle=False: sorted by length, fixed order (for eval and the reference pass)."""
    length = lambda p: max(len(p.chosen), len(p.rejected))
    if not shuffle:
        order = sorted(pairs, key=length)
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    order = list(pairs)
    rng.shuffle(order)
    window = 64 * batch_size
    order = [p for w in range(0, len(order), window) for p in sorted(order[w:w + window], key=length)]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


# -----------------------------------------------------------------------------
# Model and tokenizer


def pick_device(cfg):
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FocalpoError("--device=cuda but no CUDA GPU is visible: use --device=cpu or --device=auto")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")


def autocast(device):
    """bf16 autocast on CUDA (weights stay fp32); nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def load_tokenizer(cfg):
    if cfg.model == "demo":
        return make_demo_tokenizer()
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
    except Exception as e:
        raise load_error("the tokenizer of", cfg.model, e) from None
    if tok.pad_token_id is None:  # padding is masked explicitly, so any id will do; EOS is the usual choice
        if tok.eos_token_id is None:
            raise FocalpoError(f"the tokenizer of {cfg.model!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg, tokenizer):
    """The weights, as they come: the demo model freshly initialised, or a pretrained model in the weights' dtype.
    prepare_model then readies it for training."""
    if cfg.model == "demo":
        return make_demo_model(tokenizer, cfg.seed)
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.model, revision=cfg.revision, dtype=weights_dtype(cfg),
                                                    attn_implementation="sdpa")
    except Exception as e:
        raise load_error("model", cfg.model, e) from None


def prepare_model(model, cfg, device):
    """Dropout off (pitfall 8), the weights' dtype, attention without masks, optional gradient checkpointing,
    then onto the device."""
    for m in model.modules():  # dropout makes the policy differ from the reference at step 0
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    model = model.to(weights_dtype(cfg))  # the reference pass then runs in the same dtype (pitfall 8)
    use_causal_sdpa(model, cfg.max_length)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.to(device)


# -----------------------------------------------------------------------------
# Metrics: summed over pairs, averaged at the end, so a mean over micro-batches or eval batches is exact


def pair_metrics(losses, chosen_rewards, rejected_rewards, logps, n_tokens, ref):
    """Per-batch SUMS of per-pair metrics, as 0-dim tensors left on the device: reading each one here would make the
    CPU wait for the GPU ~15 times per micro-batch. logps/n_tokens: (2B,) policy, chosen first; ref: (B, 2)."""
    B = losses.shape[0]
    pc, pr = logps[:B].detach(), logps[B:].detach()
    nc, nr = n_tokens[:B], n_tokens[B:]
    ref_right = ref[:, 0] >= ref[:, 1]  # the reference already ranks the pair correctly (FocalPO's split)
    ranked = pc >= pr  # ranking accuracy, Chen et al. 2024 Def. 2.3: raw likelihoods, ties count as right
    win = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    count = lambda x: x.float().sum()
    return {
        "pairs": float(B), "loss": losses.detach().float().sum(),
        "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
        "rewards/margin": (chosen_rewards - rejected_rewards).sum(), "reward_accuracy": win.sum(),
        "logps/chosen": pc.sum(), "logps/rejected": pr.sum(),
        "ranking_accuracy": count(ranked),
        "ranking_accuracy_norm": count(pc / nc >= pr / nr),  # mean token log-prob version
        "ranking_accuracy_ref_correct": count(ranked & ref_right), "pairs_ref_correct": count(ref_right),
        "ranking_accuracy_ref_incorrect": count(ranked & ~ref_right), "pairs_ref_incorrect": count(~ref_right),
        "tokens": count(n_tokens),
    }


def add_metrics(total, m):
    for k, v in m.items():
        total[k] = total.get(k, 0.0) + v
    return total


def metrics_to_host(total):
    """The sums as Python floats, in one device -> host copy (one wait, however many metrics), summed over the
    processes when there are several."""
    keys = sorted(total)
    if not keys:
        return {}
    device = next((v.device for v in total.values() if torch.is_tensor(v)), torch.device("cpu"))
    if world() > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    values = torch.stack([torch.as_tensor(total[k], dtype=torch.float32, device=device) for k in keys])
    return dict(zip(keys, all_reduce(values).tolist()))


def finish_metrics(total):
    """Sums -> means. The ref-split accuracies are means within their group (None when the group is empty)."""
    out, n = {}, total["pairs"]
    for k, v in total.items():
        if k in ("pairs", "tokens", "pairs_ref_correct", "pairs_ref_incorrect"):
            out[k] = int(v)
        elif k.endswith("_ref_correct") or k.endswith("_ref_incorrect"):
            group = total["pairs_" + k.split("accuracy_")[1]]
            out[k] = v / group if group else None
        else:
            out[k] = v / n
    return out


# -----------------------------------------------------------------------------
# One optimizer step, and evaluation


def lr_at(step, total_steps, cfg, peak):
    """Linear warm-up from 0 over warmup_ratio of the steps, then cosine or linear decay to 0."""
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress)


def make_optimizer(model, cfg, lr, device):
    """AdamW, no weight decay on norms and biases; for bf16 weights the stochastic-rounding AdamWSR below, because
    plain AdamW on bf16 weights loses DPO-sized updates to rounding (pitfall 12)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.weights == "bf16":
        return AdamWSR(groups, lr=lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def forward_pairs(model, batch, ref, cfg, loss_type, device):
    """One micro-batch of pairs through the policy: per-pair losses (B,) and the batch's summed metrics. A stand-in
    batch (several processes: see next_step) runs like any other but counts for nothing."""
    r = ref[batch["idx"]]  # (B, 2), indexed on the host where the cache lives, then copied with the batch
    batch = to_device(dict(batch, ref=r), device)
    with autocast(device):
        logps, n_tokens = model_logps(model, batch)  # (2B,), (2B,): chosen first, then rejected
    B, r = len(r), batch["ref"]
    losses, chosen_rewards, rejected_rewards = preference_loss(
        logps[:B], logps[B:], r[:, 0], r[:, 1], loss_type=loss_type, beta=cfg.beta, gamma=cfg.gamma,
        focal_detach=cfg.focal_detach)
    metrics = pair_metrics(losses, chosen_rewards, rejected_rewards, logps, n_tokens, r)
    if batch.get("stand_in"):
        return 0 * losses, {k: 0 * v for k, v in metrics.items()}
    return losses, metrics


def train_step(model, optimizer, micro_batches, ref, cfg, loss_type, device, n_pairs=None):
    """One optimizer step over a list of micro-batches (gradient accumulation). Returns summed metrics (0-dim device
    tensors: see metrics_to_host), or {"nonfinite_pairs": [...]} (indices into the split) when a loss or the
    gradient is NaN/inf, in which case no update is applied. The CPU waits for the GPU once per step, to learn
    whether to apply the update. n_pairs: the pairs of the whole step (with several processes, each runs only its
    share of the micro-batches)."""
    n_pairs = n_pairs or sum(len(b["idx"]) for b in micro_batches)
    total, all_losses = {}, []
    for i, batch in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce the gradients once, after the last one
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        losses, metrics = forward_pairs(model, batch, ref, cfg, loss_type, device)
        # gradients ADD across micro-batches, so each one contributes its SUM over pairs divided by the pairs in
        # the whole step: the accumulated gradient is then the mean over the step's pairs, however they were split
        # (and however unevenly: the last batch of an epoch may be smaller) (pitfall 10)
        (losses.sum() / n_pairs).backward()
        add_metrics(total, metrics)
        all_losses.append(losses.detach())
    # clip_grad_norm_ returns the norm before clipping; with max_norm = inf it only measures
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the global norm, as a plain tensor
    finite = torch.isfinite(torch.cat(all_losses)).all() & torch.isfinite(norm)
    if not agree(finite, device, "min"):  # the step's one wait (with several processes: all must be finite)
        optimizer.zero_grad(set_to_none=True)  # a NaN/inf would poison every weight it touches: no update
        return {"nonfinite_pairs": nonfinite_pairs(micro_batches, all_losses)}
    total["grad_norm"] = norm * total["pairs"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model, batches, ref, cfg, loss_type, device):
    """Held-out metrics, averaged over the pairs of `batches`."""
    model.eval()
    total = {}
    for batch in my_share(batches):  # all of them with one process; with several, each its share
        if batch is None:  # a stand-in forward, so every process runs as many (see my_share)
            batch = dict(batches[0], stand_in=True)
        add_metrics(total, forward_pairs(model, batch, ref, cfg, loss_type, device)[1])
    reshard(model)
    model.train()
    return finish_metrics(metrics_to_host(total))


class HeldOut:
    """The held-out pairs, batched once, with their reference log-probs. Calling it gives evaluate()'s metrics (for
    the loss and options of the run's cfg) and, for the demo (whose answers can be checked), the generation accuracy
    of greedy decoding beside them."""

    def __init__(self, pairs, ref, tokenizer, cfg):
        self.pairs, self.ref, self.tokenizer = pairs, ref, tokenizer
        self.batches = [collate(b, tokenizer.pad_token_id)
                        for b in length_grouped_batches(pairs, cfg.batch_size, 0, shuffle=False)]

    def __call__(self, model, cfg, loss_type, device):
        out = evaluate(model, self.batches, self.ref, cfg, loss_type, device)
        if cfg.dataset == "demo":
            out["generation_accuracy"] = generation_accuracy(model, self.pairs, self.tokenizer, device)
        return out


# -----------------------------------------------------------------------------
# Training: the loop, and the small helpers it leans on


def steps_per_epoch(cfg, n_pairs):
    return math.ceil(math.ceil(n_pairs / cfg.batch_size) / cfg.grad_accum)


def step_stream(train_pairs, cfg, skip):
    """An endless, seeded stream of optimizer steps, each a list of up to --grad_accum micro-batches (lists of
    pairs), reshuffled every epoch. An epoch's last step may be short: a step never takes batches of two epochs.
    A resumed run skips the steps it has trained on, so it sees exactly the batches an uninterrupted run would."""
    epoch, n = 0, 0
    while True:
        batches = length_grouped_batches(train_pairs, cfg.batch_size, cfg.seed + epoch)
        for i in range(0, len(batches), cfg.grad_accum):
            if n >= skip:
                yield batches[i:i + cfg.grad_accum]
            n += 1
        epoch += 1


def next_step(steps, pad_id):
    """The next optimizer step: (this process's micro-batches, collated; the pairs in the whole step; their tokens,
    prompt and response, chosen and rejected, without padding). Every process draws the same stream; with N of
    them, each takes micro-batches rank, rank + N, ..., and a stand-in where an epoch's short last step has none."""
    step = next(steps)
    pairs = [p for b in step for p in b]
    tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    mine = [collate(b, pad_id) if b else dict(collate(step[0], pad_id), stand_in=True) for b in my_share(step)]
    return mine, len(pairs), tokens


def append_row(path, row):
    """A line of metrics.jsonl, written at once (a crash loses nothing already logged). By rank 0 only: the
    metrics it gets are already summed over the processes."""
    if rank() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def new_state():
    """Everything needed to continue exactly where we stopped, besides weights, optimizer and RNG. train_seconds
    counts the training steps alone (no evaluation, generation or checkpoint); elapsed counts everything."""
    return {"step": 0, "tokens_seen": 0, "train_seconds": 0.0, "elapsed": 0.0, "window": {}, "bad_steps": 0,
            "first_eval": None, "last_eval": None, "run_id": os.urandom(8).hex()}  # run_id: see save_checkpoint


def train_row(state, step, lr):
    """The metrics.jsonl row of the steps since the last one (the metrics' one wait per log step)."""
    row = finish_metrics(metrics_to_host(state["window"]))
    state["window"] = {}
    return dict(row, step=step, split="train", lr=lr, tokens_per_second=state["tokens_seen"] / state["train_seconds"])


def eval_line(label, step, ev):
    return (f"{label} step {step}: eval loss {ev['loss']:.4f}, reward accuracy {ev['reward_accuracy']:.3f}"
            + (f", margin {ev['rewards/margin']:.3f}" if step else "")
            + (f", generation accuracy {ev['generation_accuracy']:.3f}" if "generation_accuracy" in ev else ""))


def train(cfg, model, tokenizer, train_pairs, held_out, train_ref, loss_type, device, out_dir, log=print):
    """Train one loss from the model's current weights (or, with --resume, from the newest checkpoint in out_dir).
    Writes metrics.jsonl and checkpoints/; returns the state (first and last evaluation, tokens, times)."""
    os.makedirs(out_dir, exist_ok=True)
    pad_id, label = tokenizer.pad_token_id, f"[{loss_type}]"  # label: the prefix of every log line
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch(cfg, len(train_pairs))
    optimizer = make_optimizer(model, cfg, peak_lr(cfg), device)
    saver = Checkpoints(os.path.join(out_dir, "checkpoints"), model, optimizer, cfg, loss_type)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    state = resume(cfg, saver, metrics_path, total_steps, log) if cfg.resume else new_state()
    model.train()
    if state["first_eval"] is None:
        if rank() == 0:
            open(metrics_path, "w").close()  # a new run: a new metrics file
        state["first_eval"] = state["last_eval"] = ev = held_out(model, cfg, loss_type, device)
        append_row(metrics_path, {"step": 0, "split": "eval", **ev})
        log(eval_line(label, 0, ev))
    steps = step_stream(train_pairs, cfg, skip=state["step"])
    bar = progress_bar(cfg, total_steps, state["step"], loss_type)
    say = bar.write if bar is not None else log
    t_start, elapsed_before = time.time(), state["elapsed"]
    with StopSignals() as stop, bar if bar is not None else contextlib.nullcontext():
        while state["step"] < total_steps:
            lr = lr_at(state["step"], total_steps, cfg, peak_lr(cfg))
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro, n_pairs, n_tokens = next_step(steps, pad_id)
            t0 = time.time()
            with stop_on_out_of_memory(cfg, micro, state, saver):
                m = train_step(model, optimizer, micro, train_ref, cfg, loss_type, device, n_pairs)
            state["train_seconds"] += time.time() - t0
            state["step"] = step = state["step"] + 1
            state["elapsed"] = elapsed_before + time.time() - t_start
            if "nonfinite_pairs" in m:  # no update was made; too many such steps in a row stop the run
                skip_nonfinite_step(state, [train_pairs[i].where for i in m["nonfinite_pairs"]], cfg, saver,
                                    lambda msg: say(f"{label} {msg}"))
            else:
                state["bad_steps"], state["tokens_seen"] = 0, state["tokens_seen"] + n_tokens
                add_metrics(state["window"], m)  # still on the device
            if bar is not None:
                bar.update(1)
            if (step % cfg.log_every == 0 or step == total_steps) and state["window"]:
                row = train_row(state, step, lr)
                append_row(metrics_path, row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['reward_accuracy']:.2f}",
                                    tok_s=f"{row['tokens_per_second']:.0f}")
            if step % cfg.eval_every == 0 or step == total_steps:
                state["last_eval"] = ev = held_out(model, cfg, loss_type, device)
                append_row(metrics_path, {"step": step, "split": "eval", **ev})
                say(eval_line(label, step, ev))
            if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
                saver.save(state)
            stop.stop_here_if_asked(step, total_steps, device, saver, state)
    return state


def save_model(model, tokenizer, out_dir):
    """The trained model and its tokenizer, with save_pretrained. With several processes the full weights are
    gathered on rank 0, which writes them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    weights = get_model_state_dict(model, options=full_state_options()) if world() > 1 else None
    if rank() == 0:
        model.save_pretrained(out_dir, state_dict=weights)
        tokenizer.save_pretrained(out_dir)


def write_summary(cfg, state, loss_type, n_pairs, out_dir):
    """summary.json: the first and last evaluation, the throughput and the options. Written last: its presence
    means "this loss is done". train_tokens_per_second counts the tokens of the training steps alone (prompt and
    response, chosen and rejected, no padding) over their time alone (no evaluation, generation or checkpoint)."""
    first, last = state["first_eval"], state["last_eval"]
    summary = {"loss_type": loss_type, "steps": state["step"], "train_pairs": n_pairs[0], "eval_pairs": n_pairs[1],
               "beta": cfg.beta, "gamma": cfg.gamma, "focal_detach": cfg.focal_detach, "lr": peak_lr(cfg),
               "effective_batch": cfg.batch_size * cfg.grad_accum,
               "eval_loss_start": first["loss"], "eval_reward_accuracy_start": first["reward_accuracy"],
               "eval_generation_accuracy_start": first.get("generation_accuracy"),
               **{f"eval_{k}": v for k, v in last.items()},
               "train_tokens_per_second": state["tokens_seen"] / state["train_seconds"] if state["train_seconds"] else None,
               "train_seconds": state["train_seconds"], "runtime_seconds": state["elapsed"],
               "config": dataclasses.asdict(cfg)}
    if rank() == 0:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


# -----------------------------------------------------------------------------
# The whole job: data, reference cache, then each loss from the same initial weights


def loss_dir(cfg, loss_type):
    """Where a loss writes: --out_dir itself for one loss, --out_dir/<loss> for several."""
    return cfg.out_dir if len(loss_types(cfg)) == 1 else os.path.join(cfg.out_dir, loss_type)


def run(cfg, log=print):
    """Returns {loss_type: summary}. Under torchrun every process runs this; rank 0 logs and writes the files."""
    t0 = time.time()
    device = setup_processes(cfg)
    log = log if rank() == 0 else (lambda msg: None)
    check_before_work(cfg, device, log)  # every mistake a user can make that costs one sentence, before any work
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    train_pairs, eval_pairs = prepare_data(cfg, tokenizer, log)
    summaries, refs = {}, None
    for loss_type in loss_types(cfg):
        out_dir = loss_dir(cfg, loss_type)
        if cfg.resume and os.path.exists(os.path.join(out_dir, "summary.json")):  # same options: checked before
            log(f"[{loss_type}] already finished in {out_dir}: skipped (delete its summary.json to train it again)")
            summaries[loss_type] = read_summary(out_dir)
            continue
        model = load_model(cfg, tokenizer)  # per loss: each from the same weights
        if cfg.model == "demo" and cfg.sft_steps:  # the demo's SFT stage: as a real model would come SFT'd
            with rank0_first():  # with several processes rank 0 trains and caches it, the others load the cache
                model = sft_demo(model, tokenizer, cfg, device, log)
        model = shard_model(prepare_model(model, cfg, device), device)
        if refs is None:
            log(f"model: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
                f"{device.type}" + (f", sharded over {world()} processes (FSDP2)" if world() > 1 else ""))
        # the key includes a fingerprint of the weights just loaded, so every loss checks that it really starts
        # from the weights the reference was computed with; the second and later losses load the cache
        first, refs = refs is None, load_or_compute_reference(cfg, model, train_pairs, eval_pairs,
                                                              tokenizer.pad_token_id, device, log)
        if first:
            right = int((refs[1][:, 0] >= refs[1][:, 1]).sum())
            log(f"reference: ranks {right} of {len(eval_pairs)} held-out pairs right (π_ref(y_w|x) >= π_ref(y_l|x)) "
                f"and {len(eval_pairs) - right} wrong")
        held_out = HeldOut(eval_pairs, refs[1], tokenizer, cfg)
        state = train(cfg, model, tokenizer, train_pairs, held_out, refs[0], loss_type, device, out_dir, log)
        if cfg.save_model:
            save_model(model, tokenizer, out_dir)
        summaries[loss_type] = write_summary(cfg, state, loss_type, (len(train_pairs), len(eval_pairs)), out_dir)
        remove_checkpoints(cfg, out_dir, log)  # the run is done: its optimizer state goes, unless kept
        show_generations(model, eval_pairs, tokenizer, cfg, device, f"[{loss_type}]", log)
        del model
    log(comparison_table(summaries))
    log(f"done in {time.time() - t0:.0f}s; metrics and models in {cfg.out_dir}/")
    return summaries


def main(argv=None):
    """The command line. An error the user can fix ends in one sentence and exit code 2 (exit_code prints it)."""
    try:
        run(parse_args(argv))
        code = 0
    except BaseException as e:
        code = exit_code(e)  # in the appendix, with the other fault handling
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


# -----------------------------------------------------------------------------
# Several processes, the helpers the core calls: with one process each is a no-op or gives the plain answer


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block (and caches what it makes) before the other processes run it (and load the cache)."""
    if rank() != 0:
        dist.barrier()
    yield
    if rank() == 0 and world() > 1:
        dist.barrier()


def my_share(items):
    """This process's items of a list split over the processes (process r takes items r, r+N, ...), padded with
    None so that every process gets as many: under FSDP every forward pass is collective, so all must run one."""
    n = math.ceil(len(items) / world())
    return [items[i] if i < len(items) else None for i in range(rank(), n * world(), world())]


def all_reduce(t, op="sum"):
    """t summed (or max'ed, min'ed) over the processes, in place; t itself with one process."""
    if world() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def agree(flag, device, op):
    """A bool that every process holds the same value of: any ("max") or all ("min") of the processes' values."""
    if world() == 1:
        return bool(flag.item() if torch.is_tensor(flag) else flag)
    return bool(all_reduce(torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1), op).item())


def reshard(model):
    """After a forward pass with no backward (the reference, evaluation, generation): FSDP keeps the root module's
    parameters gathered after a forward, expecting a backward, and meanwhile the module holds the gathered tensors
    instead of its sharded parameters (which the optimizer and checkpoints know). Put the shards back."""
    if hasattr(model, "reshard"):
        model.reshard()


def model_logps(model, batch):
    """sequence_logps, through FSDP's hooks when the model is sharded."""
    return model.sequence_logps(batch) if hasattr(model, "sequence_logps") else sequence_logps(model, batch)


# =============================================================================
# Appendix: optional machinery
# =============================================================================
# A first reading can stop here. What follows: the command line and its checks, reading data files and the hub,
# the demo's SFT stage and generation accuracy, the memory plan, AdamW for bf16 weights, checkpoints and resume,
# fault handling, several processes (FSDP2).


# -----------------------------------------------------------------------------
# The command line and the options check


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def option_help():
    """{option: its explanation}: the comment after each field of Config, read from this file's source, so the
    explanation is written once."""
    import inspect
    found = re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), flags=re.M)
    return {name: text.replace("%", "%%") for name, text in found}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence, not the usage of 40 options
        raise FocalpoError(f"{message} (python focalpo.py --help lists every option)")


def parse_args(argv=None):
    """--key=value for every Config field (a bare --flag for true/false ones). An unknown option, with the nearest
    real one, a value of the wrong type or out of range: one sentence (FocalpoError)."""
    parser = _Parser(description=__doc__.split("Reading guide")[0], allow_abbrev=False,  # the run commands
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = option_help()
    for f in dataclasses.fields(Config):
        kind = {"type": _parse_bool, "nargs": "?", "const": True} if f.type is bool else {"type": f.type}
        parser.add_argument(f"--{f.name}", default=f.default, metavar=f.type.__name__.upper(),
                            help=f"{helps.get(f.name, '')} (default: {f.default!r})", **kind)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib
        name = unknown[0].split("=")[0]
        near = difflib.get_close_matches(name.lstrip("-"), [f.name for f in dataclasses.fields(Config)], n=1)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean --{near[0]}?" if near else ""))
    cfg = Config(**vars(args))
    check_config(cfg)
    return cfg


CHOICES = {"schedule": ("cosine", "linear"), "weights": ("fp32", "bf16"), "device": ("auto", "cpu", "cuda")}
AT_LEAST_1 = ("batch_size", "grad_accum", "epochs", "max_length", "max_prompt_length", "eval_every", "log_every",
              "keep_checkpoints", "max_bad_steps", "max_new_tokens", "dist_timeout")
AT_LEAST_0 = ("max_steps", "max_train_pairs", "max_eval_pairs", "sft_steps", "save_every", "lr", "gamma",
              "weight_decay", "grad_clip", "seed")


def check_config(cfg):
    """Every option's value on its own, in one place (paths, the model and earlier runs: check_before_work)."""
    losses = loss_types(cfg)
    if not losses or any(l not in LOSSES for l in losses):
        raise FocalpoError(f"--loss={cfg.loss!r}: each loss must be one of {', '.join(LOSSES)}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise FocalpoError(f"--{name}={getattr(cfg, name)!r}: expected one of {', '.join(allowed)}")
    for f in dataclasses.fields(Config):
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            raise FocalpoError(f"--{f.name}={getattr(cfg, f.name)}: must be a finite number")
    for name in AT_LEAST_1 + AT_LEAST_0:
        if getattr(cfg, name) < (1 if name in AT_LEAST_1 else 0):
            raise FocalpoError(f"--{name}={getattr(cfg, name)}: must be at least {1 if name in AT_LEAST_1 else 0}")
    if cfg.beta <= 0:
        raise FocalpoError(f"--beta={cfg.beta}: must be greater than 0")
    if not 0 < cfg.eval_fraction < 1 or not 0 <= cfg.warmup_ratio < 1:
        raise FocalpoError(f"--eval_fraction={cfg.eval_fraction} and --warmup_ratio={cfg.warmup_ratio}: the first "
                           f"must be between 0 and 1, the second at least 0 and below 1")
    if cfg.generate < -1:
        raise FocalpoError(f"--generate={cfg.generate}: must be -1 (automatic), 0 (none) or more")
    if cfg.max_prompt_length >= cfg.max_length:
        raise FocalpoError(f"--max_prompt_length={cfg.max_prompt_length} leaves no room for a response within "
                           f"--max_length={cfg.max_length}: make it smaller")
    if cfg.eval_dataset and cfg.eval_split:
        raise FocalpoError("--eval_dataset and --eval_split both name the held-out data: give one of them")


def check_before_work(cfg, device, log):
    """Everything that can be checked before the data, the SFT stage and the reference pass: the options' values
    (check_config, also for a Config made in code), the folders can be written, no other run's results are in the
    way, the data files exist, the model's config loads and its context holds --max_length, and (on a GPU) the
    memory plan fits."""
    check_config(cfg)
    for name in ("out_dir", "cache_dir"):
        check_writable_folder(name, getattr(cfg, name))
    for loss_type in loss_types(cfg):
        check_earlier_run(cfg, loss_type)
    for spec in (cfg.dataset, cfg.eval_dataset):
        if spec != "demo" and is_local_data(spec):
            data_paths(spec)
    if cfg.model == "demo":
        return
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
    except Exception as e:
        raise load_error("the config of", cfg.model, e) from None
    context = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None)
    if context and context < cfg.max_length:
        raise FocalpoError(f"--max_length={cfg.max_length} is longer than the {context} positions {cfg.model} was "
                           f"built for: lower --max_length (and --max_prompt_length) to at most {context}")
    check_memory(cfg, config, device, log, world())


def check_writable_folder(name, path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise FocalpoError(f"--{name}={path} is a file, not a folder: choose another path")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise FocalpoError(f"--{name}={path} cannot be written ({e.strerror}): choose another folder") from None


def check_earlier_run(cfg, loss_type):
    """A run never shows another run's results as its own. A new run needs a folder without results; --resume=true
    continues a run (finished or not) only with the options that made it (check_same_options)."""
    out_dir = loss_dir(cfg, loss_type)
    summary = os.path.join(out_dir, "summary.json")
    if cfg.resume:
        if os.path.exists(summary):
            check_same_options(read_summary(out_dir), cfg, loss_type, summary)
        newest = sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*.json")))[-1:]
        for meta in newest:  # its options are beside it, so a resume that would be refused stops here, not later
            try:
                with open(meta) as f:
                    recorded = json.load(f)
            except (OSError, ValueError):  # unreadable: resume() reports it and falls back to the one before
                recorded = {}
            if "config" in recorded:
                check_same_options(recorded, cfg, loss_type, meta[:-5] + ".pt")
        return
    found = [f for f in ("summary.json", "metrics.jsonl", "checkpoints") if os.path.exists(os.path.join(out_dir, f))]
    if found:
        raise FocalpoError(f"{out_dir} already holds a run's results ({', '.join(found)}): continue or show that run "
                           f"with --resume=true, or pass a new --out_dir")


def load_error(what, name, e, alternative="pass a local path"):
    """One sentence for a model, tokenizer, config or dataset that could not be loaded: the cause, and what to do."""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    cause = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not os.path.exists(name):
        return FocalpoError(f"could not load {what} {name!r}: there is no such folder; check the path")
    if os.path.exists(name):
        hint = f"check that {name} holds what save_pretrained writes"
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        hint = f"check the name; HF_HUB_OFFLINE is set, so only what is in the local cache loads; or {alternative}"
    else:
        hint = f"check the name and your network (set HF_HUB_OFFLINE=1 to fail at once), or {alternative}"
    return FocalpoError(f"could not load {what} {name!r} ({cause}): {hint}")


# -----------------------------------------------------------------------------
# Reading data files and the hub: each row with where it came from (file and 1-based line, before any shuffle)


DATA_FILES = (".jsonl", ".json", ".csv", ".parquet")  # any case; all but .parquet may also end in .gz, .bz2 or .xz


def data_file_kind(path):
    """('.jsonl', '.gz') for "pairs.JSONL.gz"; None when the name is not that of a data file."""
    name = path.lower()
    packed = next((z for z in (".gz", ".bz2", ".xz") if name.endswith(z)), "")
    ext = next((e for e in DATA_FILES if name[:len(name) - len(packed)].endswith(e)), None)
    return (ext, packed) if ext and not (ext == ".parquet" and packed) else None


def is_local_data(spec):
    return any(data_file_kind(p) or os.path.exists(p) for p in spec.split(",") if p)


def data_paths(spec):
    """The files named by a comma-separated --dataset or --eval_dataset, each checked to be there."""
    paths = [p for p in spec.split(",") if p]
    for path in paths:
        if not os.path.isfile(path):
            raise FocalpoError(f"data file {path} " + ("is a folder" if os.path.isdir(path) else "does not exist"))
    return paths


def read_local_rows(spec):
    """[(row, where)] from comma-separated files: where names the file and the row's 1-based line (JSON Lines,
    CSV), item (a JSON list) or row (Parquet)."""
    rows = []
    for path in data_paths(spec):
        kind = data_file_kind(path)
        if kind is None:
            raise FocalpoError(f"{path}: not a data file this reads; use .jsonl, .json or .csv (each may be .gz, "
                               f".bz2 or .xz compressed), or .parquet")
        rows += read_parquet(path) if kind[0] == ".parquet" else read_text_rows(path, *kind)
    for row, where in rows:
        if not isinstance(row, dict):
            raise FocalpoError(f"{where}: expected an object with prompt/chosen/rejected fields, found "
                               f"{type(row).__name__} {row!r:.40}")
    return rows


def read_parquet(path):
    try:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
    except Exception as e:
        raise FocalpoError(f"{path} is not a Parquet file this can read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return [(r, f"{path} row {i}") for i, r in enumerate(table.to_pylist(), 1)]


def read_text_rows(path, ext, packed):
    """JSON Lines, a JSON list (told apart by the first character, whatever the extension) or CSV with a header."""
    import bz2, gzip, lzma
    try:
        with {"": open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[packed](path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise FocalpoError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as e:
        line_start, line = data.rfind(b"\n", 0, e.start) + 1, data.count(b"\n", 0, e.start) + 1
        raise FocalpoError(f"{path} line {line} is not valid UTF-8 (byte "
                           f"{e.start - line_start + 1} of that line): re-encode the file as UTF-8") from None
    if ext == ".csv":
        import csv
        reader = csv.DictReader(io.StringIO(text))
        return [(row, f"{path} line {reader.line_num}") for row in reader]
    if text.lstrip().startswith("["):
        try:
            return [(r, f"{path} item {i}") for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise FocalpoError(f"{path} line {e.lineno} is not valid JSON ({e.msg}): fix that line") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((json.loads(line), f"{path} line {lineno}"))
            except json.JSONDecodeError as e:
                raise FocalpoError(f"{path} line {lineno} is not valid JSON ({e.msg}): fix or remove that line; "
                                   f"the file should be a JSON list, or one JSON object per line") from None
    return rows


def load_hub_splits(name, split, eval_split):
    """(train rows, eval rows or None) from the Hugging Face Hub (or its local cache), as (row, where) tuples."""
    try:
        import datasets
        ds = datasets.load_dataset(name)
    except Exception as e:  # network errors, unknown names, gated datasets: all end up here
        raise load_error("dataset", name, e, "pass local .jsonl/.json/.csv/.parquet files") from None
    def pick(wanted, fallbacks):
        if wanted:
            if wanted not in ds:
                raise FocalpoError(f"dataset {name!r} has no split {wanted!r}; it has: {', '.join(ds)}")
            return wanted
        return next((s for s in fallbacks if s in ds), None)
    train_split = pick(split, ("train", "train_prefs"))
    if train_split is None:
        raise FocalpoError(f"dataset {name!r} has no 'train' or 'train_prefs' split; pass --split (it has: {', '.join(ds)})")
    test_split = pick(eval_split, ("test", "test_prefs", "validation"))
    rows = lambda s: [(r, f"dataset {name!r} split {s!r} row {i}") for i, r in enumerate(ds[s], 1)]
    return rows(train_split), (rows(test_split) if test_split else None)


# -----------------------------------------------------------------------------
# The demo as the papers' setting: an SFT model first, and a task metric (greedy generation, exact match)


def make_demo_tokenizer():
    """A word-level tokenizer (one token per letter or word), built offline with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(DEMO_LETTERS) + ["sort", ":", "="])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_demo_model(tokenizer, seed):
    """A 4-layer Llama-shaped model (0.45M parameters), randomly initialised from `seed`."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


SFT_BATCH, SFT_EXAMPLES, SFT_LR = 32, 3000, 1e-3


def make_sft_rows(cfg):
    """Correct sortings (prompt, answer) whose letter SETS appear in no preference pair, so that SFT teaches the
    task without showing the model any prompt it will be asked about later (not even reordered)."""
    letters = lambda row: frozenset(row["prompt"].split()[1:-1])
    taken = {letters(r) for r in make_demo_pairs(DEMO_PAIRS, cfg.seed)}
    rows = [r for r in make_demo_pairs(SFT_EXAMPLES + 500, cfg.seed + 1) if letters(r) not in taken]
    return [(r["prompt"], " " + demo_answer(r["prompt"])) for r in rows[:SFT_EXAMPLES]]


def sft_demo(model, tokenizer, cfg, device, log=print):
    """Demo only: --sft_steps of next-token training on correct sortings, stopped early on purpose, so that the
    model sorts some held-out prompts right and many wrong. It is then the reference and every loss's starting
    point, as the SFT model is in the papers. The loss is the answer tokens' mean negative log-prob, computed with
    sequence_logps. Cached like the reference: the key covers the initial weights, the examples' token ids, the
    steps, the learning rate, the batch and the device and dtype."""
    rows = make_sft_rows(cfg)  # the word-level tokenizer has no boundary merges (cf. tokenize_pairs)
    prompts = tokenizer([p for p, _ in rows])["input_ids"]
    answers = tokenizer([a for _, a in rows], add_special_tokens=False)["input_ids"]
    seqs = [torch.tensor(p + a + [tokenizer.eos_token_id], dtype=torch.int32) for p, a in zip(prompts, answers)]
    starts = [len(p) for p in prompts]
    data = hashlib.sha256(b"".join(s.numpy().tobytes() + bytes([n]) for s, n in zip(seqs, starts)))
    model = model.to(device)
    fields = {"stage": "sft", "init": weights_fingerprint(model), "data": data.hexdigest()[:16], "steps": cfg.sft_steps,
              "lr": SFT_LR, "batch": SFT_BATCH, "compute": f"{device.type}/{next(model.parameters()).dtype}",
              "version": 1}
    key = fields_key(fields)
    path = os.path.join(cfg.cache_dir, f"sft_{key}.pt")
    cached = read_cache(path, key, "sft", log)
    if cached is not None:
        model.load_state_dict(cached)
        return model
    t0, rng = time.time(), random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR)
    model.train()
    for _ in range(cfg.sft_steps):
        chosen = rng.sample(range(len(seqs)), SFT_BATCH)
        batch = collate_sequences([seqs[i] for i in chosen], [starts[i] for i in chosen], tokenizer.pad_token_id)
        with autocast(device):
            logps, n_tokens = sequence_logps(model, to_device(batch, device))
        loss = -logps.sum() / n_tokens.sum()  # mean next-token loss over the answers' tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    write_cache(path, key, fields, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    log(f"sft: {cfg.sft_steps} steps of {SFT_BATCH} correct sortings (from {len(seqs)}, no letter set shared with a "
        f"preference pair) in {time.time() - t0:.1f}s, final loss {loss.item():.3f}; saved to {path}")
    return model


@torch.no_grad()
def greedy_completions(model, prompts, tokenizer, device, max_new_tokens, batch_size=256):
    """Greedy completions of prompts given as token ids: (text up to the first EOS, whether an EOS came) each.
    Prompts of equal length are batched together, so no padding (and no attention mask) is needed."""
    was_training, eos = model.training, tokenizer.eos_token_id
    model.eval()
    out, by_length = [None] * len(prompts), {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        for k in range(0, len(group), batch_size):
            idx = group[k:k + batch_size]
            ids = torch.stack([torch.as_tensor(prompts[i]) for i in idx]).long().to(device)
            room = getattr(model.config, "max_position_embeddings", None)
            new_tokens = min(max_new_tokens, room - ids.shape[1]) if room else max_new_tokens
            with autocast(device):
                new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, use_cache=True, eos_token_id=eos,
                                     pad_token_id=tokenizer.pad_token_id,
                                     synced_gpus=world() > 1)[:, ids.shape[1]:]  # FSDP: every process, every step
            for i, row in zip(idx, new.tolist()):
                end = row.index(eos) if eos in row else len(row)
                out[i] = (tokenizer.decode(row[:end], skip_special_tokens=True), end < len(row))
    reshard(model)
    model.train(was_training)
    return out


def expected_answer(pair, tokenizer):
    """Demo: the right answer to the pair's prompt (not its chosen answer, which may have a mistake)."""
    return demo_answer(tokenizer.decode(pair.chosen[:pair.chosen_start], skip_special_tokens=True))


def is_right(pair, completion, tokenizer):
    """Demo: a greedy completion (text, whether it ended with EOS) is the right answer, exactly, and then stops."""
    text, ended = completion
    return ended and text.strip() == expected_answer(pair, tokenizer)


def generation_accuracy(model, pairs, tokenizer, device):
    """Demo: the fraction of prompts whose greedy completion is exactly the right answer, compared as decoded text,
    and then ends (EOS)."""
    longest = max(len(p.chosen) - p.chosen_start for p in pairs)  # the longest answer with its EOS, in tokens
    # one token more: a completion that runs past the right answer shows as one, rather than being cut off there
    got = greedy_completions(model, [p.chosen[:p.chosen_start] for p in pairs], tokenizer, device, longest + 1)
    return sum(is_right(p, c, tokenizer) for p, c in zip(pairs, got)) / len(pairs)


def show_generations(model, pairs, tokenizer, cfg, device, label, log):
    """--generate=N: the first N held-out prompts with the policy's greedy completions (and, for the demo, the
    correct answer)."""
    n = cfg.generate if cfg.generate >= 0 else (5 if cfg.dataset == "demo" else 0)
    if n <= 0:
        return
    pairs = pairs[:n]
    got = greedy_completions(model, [p.chosen[:p.chosen_start] for p in pairs], tokenizer, device, cfg.max_new_tokens)
    for p, (text, ended) in zip(pairs, got):
        prompt = tokenizer.decode(p.chosen[:p.chosen_start], skip_special_tokens=True)
        line = f"{label} {prompt[-200:]!r} -> {text!r}{'' if ended else ' (no EOS)'}"
        if cfg.dataset == "demo":
            line += "   right" if is_right(p, (text, ended), tokenizer) else f"   wrong: expected {expected_answer(p, tokenizer)!r}"
        log(line)


# -----------------------------------------------------------------------------
# Attention without a mask: faster, and no GPU wait (see sequence_logps for why right padding needs no mask)


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, given no mask: causal when several queries come at once (training, scoring,
    a prompt), full for a single decoded token. See sequence_logps for why right-padded batches need no mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def use_causal_sdpa(model, max_length):
    """Switch the model to _causal_sdpa, unless it has a sliding window shorter than max_length (then the mask
    matters). With it transformers builds no mask and checks none on the host (a GPU wait every forward), and
    SDPA can take its fastest causal kernels."""
    from transformers import AttentionInterface
    window = getattr(model.config, "sliding_window", None)
    if window is not None and window < max_length:
        return False
    AttentionInterface.register("causal_sdpa", _causal_sdpa)
    model.set_attn_implementation("causal_sdpa")
    return True


# -----------------------------------------------------------------------------
# Memory plan (GPU only): will training fit? An estimate, stated, not a measurement


GiB = 2 ** 30


def bytes_per_parameter(cfg, world_size=1):
    """Training state per parameter: fp32 weights + gradients + AdamW's two moments (4+4+4+4), plus the bf16 copy
    autocast makes of each weight during the step (2); or, with --weights=bf16, 2+2+2+2. Sharded over several
    processes (FSDP2) the bf16 copies exist only for the layers being gathered, so fp32 is 16 (not counted here)."""
    return 8 if cfg.weights == "bf16" else (18 if world_size == 1 else 16)


def activation_bytes(config, cfg):
    """An allowance for activations at --batch_size pairs (2x as many sequences) of --max_length tokens each.

    Without checkpointing, a decoder layer keeps about 30*H + 8*I bytes per token for backward (bf16: the inputs of
    its six projections, q/k/v after RoPE, the attention output, the SwiGLU products, the norms' fp32 copies).
    With checkpointing it keeps only its input (H values, in the weights' dtype), and one layer at a time is
    recomputed with its full activations. Plus the log-prob chunk: 2048 positions x vocabulary x 10 bytes (bf16
    logits, their fp32 copy and its gradient)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = 2 * cfg.batch_size * cfg.max_length
    full_layer = (30 * H + 8 * I) * tokens
    if cfg.gradient_checkpointing:
        layers = (2 if cfg.weights == "bf16" else 4) * H * tokens * L + full_layer
    else:
        layers = full_layer * L
    return layers + 2048 * config.vocab_size * 10


def memory_plan(config, cfg, world_size=1):
    """(bytes needed per GPU, a one-line account of them). Parameters are counted on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    state = n * bytes_per_parameter(cfg, world_size) / world_size  # sharded over the processes (FSDP) with several
    buffers = 28 * min(AdamWSR.bucket_numel, n) if cfg.weights == "bf16" else 0
    acts = activation_bytes(config, cfg)
    what = "bf16 weights, gradients, AdamW moments" if cfg.weights == "bf16" else \
           "fp32 weights, gradients, AdamW moments, bf16 autocast copies"
    line = (f"memory plan: {n / 1e9:.2f}B parameters x {bytes_per_parameter(cfg, world_size)} bytes ({what})"
            + (f" / {world_size} processes" if world_size > 1 else "") + f" = {state / GiB:.1f} GiB"
            + (f" + optimizer buffers {buffers / GiB:.1f} GiB" if buffers else "")
            + f" + activations ~{acts / GiB:.1f} GiB ({cfg.batch_size} pairs x {cfg.max_length} tokens, gradient "
            f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}) = ~{(state + buffers + acts) / GiB:.1f} GiB")
    return state + buffers + acts, line


def check_memory(cfg, config, device, log=print, world_size=1):
    """On a GPU, before loading a real model (its config is enough): print the plan beside the free memory, and
    stop at once when it cannot fit, rather than after the reference pass."""
    if device.type != "cuda":
        return
    needed, line = memory_plan(config, cfg, world_size)
    free = torch.cuda.mem_get_info(device)[0]
    log(f"{line}; free on the GPU: {free / GiB:.1f} GiB")
    if needed > free:
        savers = ([] if cfg.weights == "bf16" else
                  [f"--weights=bf16 (8 bytes per parameter instead of {bytes_per_parameter(cfg, world_size)})"]) + \
                 ([] if cfg.gradient_checkpointing else ["--gradient_checkpointing=true"])
        raise FocalpoError(f"training {cfg.model} needs about {needed / GiB:.1f} GiB but the GPU has "
                           f"{free / GiB:.1f} GiB free: " + (f"add {' and '.join(savers)}, or " if savers else "")
                           + "lower --batch_size (raising --grad_accum) or --max_length, or spread the model over "
                           "more GPUs with torchrun")


# -----------------------------------------------------------------------------
# --weights=bf16 (pitfall 12): AdamW with fp32 math, stochastic rounding back to bf16


def stochastic_round_bf16(x, noise=None):
    """fp32 -> bf16, rounding up or down at random so that the result equals x in expectation.

    bf16 is the top 16 bits of an fp32. Adding 16 random bits to the low half of the bit pattern carries into the
    top half with probability (x's distance from the bf16 value below it) / (bf16 spacing); then drop the low half.
    Works for both signs: the pattern is sign + magnitude, and the addition only ever grows the magnitude.
    noise: int32 values in [0, 2^16), shaped like x (drawn here when not given)."""
    if noise is None:
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return stochastic_round_bf16_(x.float().clone().reshape(-1), noise.reshape(-1)).reshape(x.shape).clone()


def stochastic_round_bf16_(x, noise):
    """stochastic_round_bf16 in place on a flat fp32 tensor, for AdamWSR's buffers: adds the noise to x's bit
    patterns and returns the bf16 numbers as a view of x's top halves (little-endian: int16 number 1 of each fp32)."""
    x.view(torch.int32).add_(noise)
    return x.view(torch.int16).view(-1, 2)[:, 1].view(torch.bfloat16)


def _local(t):
    """This process's part of a tensor: the local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamWSR(torch.optim.Optimizer):
    """AdamW whose state lives in the parameters' dtype (bf16: 2+2+2 bytes per weight instead of 4+4+4) but whose
    arithmetic is fp32. Weights and both moments are written back with stochastic rounding. With round-to-nearest,
    a step of lr = 5e-7 on a bf16 weight of 0.02 (spacing 1.2e-4) is rounded away every time. With stochastic
    rounding the weight moves by the right amount on average.

    Speed: the parameters are updated in flat fp32 buckets of at most `bucket_numel` elements (a large tensor is
    split across buckets), so each operation below runs once per bucket, not once per parameter, and the fp32
    temporaries are bounded: 4 fp32 buffers, 1 int64 and 1 int32 = 28 bytes x bucket_numel (0.94 GB at the default
    2^25, whatever the model's size), allocated once and reused every step. The step count is a Python int (no
    host sync per parameter), and one int64 of random bits per element serves all three roundings (its bits 0-15
    for the weight, 16-31 for the first moment, 32-47 for the second), a third of the random-number work of one draw each.
    """

    bucket_numel = 1 << 25

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._work = None  # the reusable fp32/int buffers, made on the first step

    def random_bits(self, n, device):
        """n int64 values with (at least) 48 random low bits; a method so that tests can supply fixed bits."""
        return self._buffer("bits", n, torch.int64, device).random_()

    @torch.no_grad()
    def step(self, closure=None):  # closure: unused, accepted because torch.distributed.checkpoint passes it
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            by_step = {}  # parameters that missed a step (no gradient) keep their own count: bucket by count
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] = int(state["step"]) + 1
                by_step.setdefault(state["step"], []).append(p)
            for t, ps in by_step.items():
                for pieces in self._buckets(ps):
                    self._update(pieces, group, t)

    def _buckets(self, params):
        """Lists of (param, start, end) slices of the flattened parameters, at most bucket_numel elements each.
        With several processes (FSDP2) a parameter is a DTensor: its local shard is what this process updates."""
        bucket, room = [], self.bucket_numel
        for p in params:
            if not _local(p).is_contiguous():
                raise ValueError("AdamWSR needs contiguous parameters")
            start, numel = 0, _local(p).numel()
            while start < numel:
                end = min(numel, start + room)
                bucket.append((p, start, end))
                room -= end - start
                start = end
                if room == 0:
                    yield bucket
                    bucket, room = [], self.bucket_numel
        if bucket:
            yield bucket

    def _buffer(self, name, n, dtype, device):
        """The first n elements of a reusable buffer (no allocation, so no page faults, after the first step)."""
        if self._work is None:
            self._work = {}
        buf = self._work.get(name)
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self._work[name] = torch.empty(min(self.bucket_numel, max(n, 1)), dtype=dtype, device=device)
        return buf[:n]

    def _update(self, pieces, group, t):
        beta1, beta2 = group["betas"]
        lr, device = group["lr"], pieces[0][0].device
        sizes = [e - s for _, s, e in pieces]
        n = sum(sizes)
        def views(get):  # the bucket's slices of a tensor per parameter (the parameter, its gradient or a moment)
            return [_local(get(p)).view(-1)[s:e] for p, s, e in pieces]
        ws, gs, ms, vs = (views(f) for f in (lambda p: p, lambda p: p.grad, lambda p: self.state[p]["exp_avg"],
                                              lambda p: self.state[p]["exp_avg_sq"]))
        w, g, m, v = (self._buffer(name, n, torch.float32, device) for name in ("w", "g", "m", "v"))
        for flat, src in ((w, ws), (g, gs), (m, ms), (v, vs)):
            torch._foreach_copy_(list(flat.split(sizes)), src)  # gather and upcast to fp32 in one pass
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if group["weight_decay"]:
            w.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
        denom = torch.div(v, 1 - beta2 ** t, out=g).sqrt_().add_(group["eps"])  # g is no longer needed: reuse it
        w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        words = self.random_bits(n, device).view(torch.int32).view(n, 2)  # each int64 as two 32-bit words
        noise = self._buffer("noise", n, torch.int32, device)
        for k, (flat, dst) in enumerate(((w, ws), (m, ms), (v, vs))):
            if dst[0].dtype != torch.bfloat16:
                torch._foreach_copy_(dst, list(flat.split(sizes)))
                continue
            # the noise is bits 0-15 of the int64 for the weight, 16-31 for m, 32-47 for v
            word = words[:, 1] if k == 2 else words[:, 0]
            if k == 1:
                word = torch.bitwise_right_shift(word, 16, out=noise)
            rounded = stochastic_round_bf16_(flat, torch.bitwise_and(word, 0xFFFF, out=noise))  # (n,) bf16
            torch._foreach_copy_(dst, list(rounded.split(sizes)))


# -----------------------------------------------------------------------------
# Cache files and checkpoints: written atomically, verified when read back


def _digest(tensors):
    """SHA-256 of a dict of tensors (any dtype), in key order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_cache(path, key, what, log):
    """The tensors cached at path under `key`, or None when there is no such file. A file that cannot be read, or
    whose key or checksum does not match (edited, or written by another version), is reported and ignored."""
    if not os.path.exists(path):
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["key"] == key and blob["checksum"] == _digest(blob["tensors"]):
            log(f"{what}: loaded cached values from {path}")
            return blob["tensors"]
        problem = "its contents do not match its key or checksum (edited, or written by another version)"
    except Exception as e:
        problem = f"it cannot be read ({type(e).__name__})"
    log(f"{what}: WARNING: ignoring the cache file {path}: {problem}; recomputing it")
    return None


def write_cache(path, key, fields, tensors):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"key": key, "fields": fields, "tensors": tensors, "checksum": _digest(tensors)}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash mid-write never leaves a half-written cache behind


class HashingFile:
    """A file opened for writing that computes the SHA-256 of what is written to it as it is written, so a
    checkpoint is never read back to be hashed. Each large block is hashed in a second thread while it is written
    (hashlib and file writes both release the GIL), so where writing waits on the disk the hash runs meanwhile (on
    a 2-core machine writing to the page cache it did not hide: see the README); both finish before write()
    returns, because torch may reuse the block afterwards. close() stops the thread and closes the file."""

    def __init__(self, path):
        from concurrent.futures import ThreadPoolExecutor
        self.f, self.sha, self.pool = open(path, "wb"), hashlib.sha256(), ThreadPoolExecutor(1)

    def write(self, block):
        if len(block) < 1 << 20:
            self.sha.update(block)
            return self.f.write(block)
        hashed = self.pool.submit(self.sha.update, block)
        n = self.f.write(block)
        hashed.result()
        return n

    def flush(self):
        self.f.flush()

    def close(self):
        self.pool.shutdown()
        self.f.close()


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# What a resumed run must share with the run it resumes; anything else (logging, evaluation, checkpoint frequency,
# progress bar, device, number of processes) may change
RESULT_OPTIONS = ("beta", "gamma", "focal_detach", "lr", "batch_size", "grad_accum", "epochs", "max_steps",
                  "warmup_ratio", "schedule", "weight_decay", "grad_clip", "seed", "model", "revision", "dataset",
                  "split", "eval_dataset", "eval_split", "eval_fraction", "max_train_pairs", "max_eval_pairs",
                  "max_length", "max_prompt_length", "weights", "sft_steps")


def save_checkpoint(ckpt_dir, model, optimizer, state, keep, cfg=None, loss_type=None):
    """step_NNNNNNN.pt (model, optimizer, RNG, training state, the options and the loss) and, once that is complete,
    its step_NNNNNNN.json (size, SHA-256 and the run it belongs to). Each is written under a temporary name and
    renamed, so a file with its final name is whole. The newest `keep` checkpoints of this run are kept; files of
    any other run are never touched. With several processes, all gather and rank 0 writes. Returns the path."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    path = os.path.join(ckpt_dir, f"step_{state['step']:07d}.pt")
    blob = {"model": get_model_state_dict(model, options=full_state_options()),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=full_state_options()),
            "state": state, "config": dataclasses.asdict(cfg) if cfg else None, "loss_type": loss_type,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    if rank() != 0:
        return path
    os.makedirs(ckpt_dir, exist_ok=True)
    out = HashingFile(path + ".tmp")
    try:
        torch.save(blob, out)
    finally:
        out.close()
    os.replace(path + ".tmp", path)
    with open(path + ".json.tmp", "w") as f:
        json.dump({"step": state["step"], "bytes": os.path.getsize(path), "sha256": out.sha.hexdigest(),
                   "run": state.get("run_id"), "loss_type": loss_type, "config": blob["config"]}, f)
    os.replace(path + ".json.tmp", path[:-3] + ".json")
    for old in checkpoints_of_run(ckpt_dir, state.get("run_id"))[:-keep]:
        for f in (old, old[:-3] + ".json"):
            os.remove(f)
    return path


def checkpoints_of_run(ckpt_dir, run_id):
    """The finished checkpoint files of one run, oldest first: those whose .json names it."""
    mine = []
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "step_*.pt"))):
        try:
            with open(path[:-3] + ".json") as f:
                if json.load(f).get("run") == run_id:
                    mine.append(path)
        except (OSError, ValueError):
            pass
    return mine


class Checkpoints:
    """A run's checkpoints/ folder: save(state) writes one and remembers its path in .last, to name it if the run
    must stop."""

    def __init__(self, folder, model, optimizer, cfg, loss_type):
        self.folder, self.model, self.optimizer, self.cfg, self.loss_type = folder, model, optimizer, cfg, loss_type
        self.last = None

    def save(self, state):
        state["window"] = metrics_to_host(state["window"])  # floats (and, with several processes, their sums)
        self.last = save_checkpoint(self.folder, self.model, self.optimizer, state, self.cfg.keep_checkpoints,
                                    self.cfg, self.loss_type)
        if rank() != 0:  # the sums now count once, on rank 0 (as after a resume)
            state["window"] = {}
        return self.last


def remove_checkpoints(cfg, out_dir, log):
    """A finished run keeps its model and summary; its checkpoints (weights and optimizer state, each about 3x the
    model) go, unless --keep_final_checkpoint=true."""
    folder = os.path.join(out_dir, "checkpoints")
    if cfg.keep_final_checkpoint or rank() != 0 or not os.path.isdir(folder):
        return
    for path in glob.glob(os.path.join(folder, "step_*")):
        os.remove(path)
    if not os.listdir(folder):
        os.rmdir(folder)


def find_latest_checkpoint(ckpt_dir, log=print):
    """The newest checkpoint whose size and checksum match its .json, or None. Damaged ones are reported and
    skipped, so a truncated or corrupted last checkpoint falls back to the one before."""
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "step_*.pt")), reverse=True):
        try:
            with open(path[:-3] + ".json") as f:
                meta = json.load(f)
            if os.path.getsize(path) != meta["bytes"]:
                raise ValueError(f"it has {os.path.getsize(path)} bytes, {meta['bytes']} were written")
            if _sha256_file(path) != meta["sha256"]:
                raise ValueError("its checksum does not match (corrupted)")
            return path
        except FileNotFoundError:
            problem = "its .json is missing (the save did not finish)"
        except Exception as e:
            problem = str(e) or type(e).__name__
        log(f"checkpoint: WARNING: skipping {path}: {problem}")
    return None


def load_latest_checkpoint(ckpt_dir, log=print):
    """(the newest good checkpoint, its path), or (None, None). With several processes rank 0 checks the files
    and the others take its answer; every process then maps the file (mmap: no copy in memory)."""
    path = find_latest_checkpoint(ckpt_dir, log) if rank() == 0 else None
    if world() > 1:
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
    if path is None:
        return None, None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True), path


def check_same_options(recorded, cfg, loss_type, path):
    """--resume continues a run (a checkpoint, or a finished run's summary.json) only with the options that
    produced it: one sentence naming each that differs."""
    if not recorded.get("config"):
        raise FocalpoError(f"{path} records no options (written by an older focalpo): start a new --out_dir")
    was = recorded["config"]
    diffs = [f"--{k} was {was.get(k)!r}, now {getattr(cfg, k)!r}" for k in RESULT_OPTIONS if was.get(k) != getattr(cfg, k)]
    if recorded["loss_type"] != loss_type:
        diffs.insert(0, f"the loss was {recorded['loss_type']!r}, now {loss_type!r}")
    if diffs:
        raise FocalpoError(f"--resume=true with options that change the result ({'; '.join(diffs)}) would not "
                           f"continue {path}: run with the original values, or start a new --out_dir")


def read_summary(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def resume(cfg, saver, metrics_path, total_steps, log):
    """With --resume: weights, optimizer, RNG and state from the newest good checkpoint (written with any number of
    processes), after checking that the options that change the result are the same; metrics.jsonl is cut back to
    it. Returns the state (a new one when there is no checkpoint); saver.last is the checkpoint's path."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    ckpt, path = load_latest_checkpoint(saver.folder, log)
    if ckpt is None:
        log(f"[{saver.loss_type}] --resume: no usable checkpoint in {saver.folder}, starting from the beginning")
        return new_state()
    check_same_options(ckpt, cfg, saver.loss_type, path)
    full = StateDictOptions(full_state_dict=True)  # each process takes its shard from the full tensors
    set_model_state_dict(saver.model, ckpt["model"], options=full)
    set_optimizer_state_dict(saver.model, saver.optimizer, ckpt["optimizer"], options=full)
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    state, saver.last = ckpt["state"], path
    state.setdefault("train_seconds", state["elapsed"])  # written before training time was counted apart
    if rank() != 0:  # the saved metrics window holds the sums of all processes: rank 0 carries them, once
        state["window"] = {}
    if rank() == 0:
        cut_metrics_file(metrics_path, state["step"], log)
    log(f"[{saver.loss_type}] resumed from {path} at step {state['step']} of {total_steps}")
    return state


def cut_metrics_file(path, step, log):
    """At a resume, keep the lines of metrics.jsonl up to the checkpoint's step (the later ones will be written
    again). A torn last line (a crash mid-write) is dropped; a missing file is started anew; both are reported."""
    if not os.path.exists(path):
        log(f"WARNING: {path} is missing: its rows up to step {step} are lost; the rows from here on go to a new one")
        open(path, "w").close()
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno < len(lines):
                raise FocalpoError(f"{path} line {lineno} is not valid JSON: fix or remove that line, then resume "
                                   f"again") from None
            log(f"WARNING: {path}: dropped its last line, which was cut short ({line.strip()[:40]!r}...)")
            continue
        if row["step"] <= step:
            kept.append(line)
    with open(path, "w") as f:
        f.writelines(kept)


# -----------------------------------------------------------------------------
# Output: the table that compares the losses, the progress bar


def comparison_table(summaries):
    cols = [("eval_reward_accuracy_start", "reward acc @0"), ("eval_reward_accuracy", "reward acc"),
            ("eval_rewards/margin", "margin"), ("eval_ranking_accuracy", "rank acc"),
            ("eval_ranking_accuracy_ref_correct", "rank acc (ref right)"),
            ("eval_ranking_accuracy_ref_incorrect", "rank acc (ref wrong)"),
            ("eval_logps/chosen", "logp chosen"), ("eval_logps/rejected", "logp rejected"),
            ("eval_generation_accuracy_start", "gen acc @0"), ("eval_generation_accuracy", "gen acc")]
    cols = [(k, name) for k, name in cols if any(s.get(k) is not None for s in summaries.values())]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    widths = [max(8, len(name) + 2) for _, name in cols]
    name = lambda lt, s: lt + (" (detached)" if lt == "focalpo" and s.get("focal_detach") else "")
    lines = ["", "held-out results (" + f"{next(iter(summaries.values()))['eval_pairs']} pairs)",
             f"{'loss':<19}" + "".join(f"{name:>{w}}" for (_, name), w in zip(cols, widths))]
    for lt, s in summaries.items():
        lines.append(f"{name(lt, s):<19}" + "".join(f"{fmt(s.get(k)):>{w}}" for (k, _), w in zip(cols, widths)))
    return "\n".join(lines)


def progress_bar(cfg, total_steps, done, loss_type):
    if not cfg.progress or rank() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total_steps, initial=done, desc=loss_type, dynamic_ncols=True, leave=False)


# -----------------------------------------------------------------------------
# Fault handling: signals, non-finite steps, out of memory, a lost process


class StopSignals:
    """Ctrl-C / SIGTERM during training set .signal, so the loop can finish the step in flight, save and stop.
    A second signal stops at once (KeyboardInterrupt). Outside the main thread no handler can be installed."""

    def __enter__(self):
        self.signal, self.old = None, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self.on_signal)
            except ValueError:
                pass
        return self

    def on_signal(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def stop_here_if_asked(self, step, total_steps, device, saver, state):
        """At a step boundary: after a signal (to this process or, with several, to any), save and stop."""
        if agree(self.signal is not None, device, "max") and step < total_steps:  # every process stops here
            by = signal.Signals(self.signal).name if self.signal else "a signal to another process"
            raise Interrupted(f"stopped by {by} at step {step} of {total_steps}; checkpoint saved to "
                              f"{saver.save(state)}. To continue, run the same command with --resume=true")


def nonfinite_pairs(micro_batches, losses):
    """The step's pairs (indices into the split) whose loss is not finite, from every process. Rare: waits are fine."""
    bad = [i for b, l in zip(micro_batches, losses) if not b.get("stand_in")
           for i in b["idx"][~torch.isfinite(l).cpu()].tolist()]
    if world() > 1:
        gathered = [None] * world()
        dist.all_gather_object(gathered, bad)
        bad = sorted(i for share in gathered for i in share)
    return bad


def skip_nonfinite_step(state, where, cfg, saver, say):
    """A step whose loss or gradient was NaN/inf made no update: say which rows it had, and stop the run after
    --max_bad_steps of them in a row."""
    state["bad_steps"] += 1
    rows = ", ".join(where) or "none: the gradient only"
    say(f"step {state['step']}: WARNING: non-finite loss or gradient, update skipped (training rows: {rows})")
    if state["bad_steps"] >= cfg.max_bad_steps:
        raise FocalpoError(
            f"{state['bad_steps']} consecutive steps had a non-finite loss or gradient (last at step {state['step']}, "
            f"training rows: {rows}): stopped; check those rows or lower --lr. "
            + (f"The last good checkpoint is {saver.last} (--resume=true)." if saver.last else
               "No checkpoint was written yet."))


@contextlib.contextmanager
def stop_on_out_of_memory(cfg, micro, state, saver):
    """Out of GPU memory in a step: save the last completed step, then stop with the options that use less memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        saver.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        saved = saver.save(state) if state["step"] else None
        longest = max(b["input_ids"].shape[1] for b in micro)
        raise FocalpoError(
            f"out of GPU memory at step {state['step'] + 1} with --batch_size={cfg.batch_size} pairs "
            f"({2 * cfg.batch_size} sequences) of up to {longest} tokens (--max_length={cfg.max_length}): lower "
            f"--batch_size and raise --grad_accum to keep the effective batch, or set --gradient_checkpointing=true, "
            f"or lower --max_length" + (f"; checkpoint saved to {saved}, continue with --resume=true" if saved else "")
        ) from None


def exit_code(e):
    """main(): print one line for an error a user can fix, or a stop, and return the exit code; re-raise the rest."""
    who = f"[rank {os.environ.get('RANK')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    if isinstance(e, Interrupted):
        for sig in (signal.SIGINT, signal.SIGTERM):  # saved already: a late signal (a launcher sends one to every
            signal.signal(sig, signal.SIG_IGN)      # process) must not cut the exit short
        print(f"{who}interrupted: {e}", file=sys.stderr)
        return 130
    if isinstance(e, FocalpoError):
        print(f"{who}error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C, or one outside training: nothing to save
        print(f"{who}interrupted", file=sys.stderr)
        return 130
    if isinstance(e, RuntimeError) and lost_contact(e):
        detail = str(e).splitlines()[0].split("] ", 1)[-1][:120]  # without gloo's source-file prefix
        print(f"{who}error: lost contact with another process ({detail}): it stopped or hung, see its own "
              f"output; the newest checkpoint continues with --resume=true", file=sys.stderr)
        return 1
    raise e


def lost_contact(e):
    """A collective that failed because another process died, hung or closed its connection."""
    return world() > 1 and (isinstance(e, dist.DistError) or any(
        s in str(e) for s in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL")))


# -----------------------------------------------------------------------------
# Several processes (torchrun --nproc_per_node=N focalpo.py ...): FSDP2


def setup_processes(cfg):
    """The device; under torchrun (WORLD_SIZE > 1) also join the process group: NCCL on CUDA, gloo on the CPU, with
    a timeout on collectives, so that a process that hangs makes the others stop instead of waiting forever (one
    that dies is noticed at once)."""
    device, n = pick_device(cfg), int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if cfg.grad_accum % n:
        raise FocalpoError(f"--grad_accum={cfg.grad_accum} is not a multiple of the {n} processes: each process takes "
                           f"an equal share of every step's micro-batches; use --grad_accum={n * math.ceil(cfg.grad_accum / n)}")
    return device


def shard_model(model, device):
    """FSDP2: each decoder layer, then the whole model, sharded over the processes. fp32 weights compute in bf16 on
    CUDA (fp32 master copies, fp32 gradient reduction), as autocast does with one process. Gradients are SUMMED
    over the processes: each process's loss is already divided by the pairs of the whole step (train_step), so the
    sum is the step's mean gradient. sequence_logps and generate call the model's parts directly, so they are
    registered as forward methods: FSDP then gathers the embedding, final norm and output layer around them."""
    if world() == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    bf16_compute = device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute else MixedPrecisionPolicy()
    for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum, do not average
            m.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no pre-scaled reduction
    model.sequence_logps = types.MethodType(sequence_logps, model)
    register_fsdp_forward_method(model, "sequence_logps")
    register_fsdp_forward_method(model, "generate")
    return model.to(device)


def full_state_options():
    """Checkpoints hold full (unsharded) tensors whatever the number of processes, so a run saved with 2 processes
    resumes with 1 and the reverse. With several, rank 0 gathers them to its host memory, one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=world() > 1, cpu_offload=world() > 1)


if __name__ == "__main__":
    main()
