"""
focalpo: preference optimisation beyond DPO, in one readable file.

Trains a Hugging Face causal LM on preference pairs (prompt, chosen, rejected) with one of three losses:
    DPO       Rafailov et al. 2023, arXiv 2305.18290
    FocalPO   Liu et al. 2025,      arXiv 2501.06645
    MinorDPO  Xie et al. 2024,      arXiv 2408.09834

    python focalpo.py        # the demo: offline, a tiny model built from a config, one to two minutes on 2 CPU cores
    python focalpo.py --model=Qwen/Qwen2.5-0.5B-Instruct --dataset=trl-lib/ultrafeedback_binarized --loss=focalpo
    python focalpo.py --model=path/to/model --dataset=pairs.jsonl --eval_dataset=heldout.jsonl
    torchrun --nproc_per_node=8 focalpo.py --model=... --dataset=... --grad_accum=8    # several GPUs (FSDP2)
    python focalpo.py --help # every option, explained

Reading guide: the core comes in reading order (Config, the losses, log-probs, the reference cache, data and
tokenization, the model, one step and evaluation, train() and run()). A first reading stops at "# Appendix".

Conventions (the reference implementations disagree on all three):
  - log π(y|x) is the SUM of the response tokens' log-probs (not the mean), as in the DPO paper.
  - rewards are β·(log πθ − log π_ref), detached (for logging only).
  - reward accuracy counts a tie (r_w == r_l) as half right: exactly 0.5 at step 0, where the policy is the
    reference. Ranking accuracy (Chen et al. 2024) counts ties as right (≥).
"Pitfall N" is one of the README's 13 ways DPO implementations have gone wrong, each guarded against here.
"""

import argparse
import collections
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
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
from tqdm import tqdm

# --- Config: every default on one line; override any as --key=value

@dataclass
class Config:
    # model and data
    model: str = "demo"  # "demo" (a tiny model built from a config, offline), a hub name, or a local folder
    dataset: str = "demo"  # "demo" (a sorting task made in code), a hub name, or .jsonl/.json/.csv/.parquet files
    eval_dataset: str = ""  # held-out files; "" = the dataset's test split if it has one, else a seeded 5% of it
    max_train_pairs: int = 0  # use at most this many training pairs (0 = all)
    max_eval_pairs: int = 500  # evaluate on at most this many held-out pairs (0 = all)
    max_length: int = 1024  # prompt + response tokens, per sequence
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    sft_steps: int = 80  # demo only: next-token training on correct sortings first, so the reference knows something
    # loss
    loss: str = "dpo,focalpo,minordpo"  # one loss or a comma-separated list, each trained from the same start
    beta: float = 0.1  # β, the implicit reward's inverse temperature: larger = stay closer to the reference
    gamma: float = 0.05  # FocalPO's γ (0 = DPO). 0.05 is THIS PROJECT's default, not a value from the paper
    focal_detach: bool = False  # FocalPO variant: p^γ a constant weight (gradient weight p^γ(1-p), never negative)
    # optimisation
    lr: float = 0.0  # peak learning rate; 0 = 3e-4 for the demo, 5e-7 for other models (the DPO reference code's)
    batch_size: int = 8  # pairs per micro-batch (two sequences each)
    grad_accum: int = 2  # micro-batches per optimizer step: a step is batch_size * grad_accum pairs
    epochs: int = 1  # passes over the training pairs
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    warmup_ratio: float = 0.1  # fraction of steps warming up linearly from 0; then a cosine decay to 0
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    gradient_checkpointing: bool = False  # recompute activations in backward: much less memory, ~30% slower
    weights: str = "fp32"  # "fp32" (bf16 autocast on a GPU), or "bf16": half the memory, AdamW with stochastic rounding
    # run
    seed: int = 1337  # seeds the demo's model, the data split and the shuffling
    eval_every: int = 25  # evaluate every this many optimizer steps (and at the start and the end)
    log_every: int = 5  # a line in metrics.jsonl every this many optimizer steps
    out_dir: str = "out"  # one run's metrics, summary and model (out_dir/<loss>/ for several losses)
    cache_dir: str = "ref_cache"  # cached reference log-probs (and the demo's SFT weights)
    save_model: bool = True  # save the trained model and tokenizer (save_pretrained) at the end
    save_every: int = 100  # checkpoint every this many optimizer steps (and at the end); 0 = only at the end
    keep_final_checkpoint: bool = False  # keep a finished run's last checkpoint (by default: model and summary only)
    resume: bool = False  # continue the run in out_dir from its newest checkpoint (finished losses: shown, not rerun)
    dist_timeout: int = 900  # several processes: seconds a collective may wait before the run stops
    progress: bool = True  # show a tqdm progress bar
    generate: int = -1  # at the end, show this many held-out prompts' greedy completions (-1: 5 for the demo, else 0)

LOSSES = ("dpo", "focalpo", "minordpo")

class FocalpoError(Exception):
    """A problem the user can fix: main() prints it as one sentence, without a traceback."""

class Interrupted(FocalpoError):
    """Ctrl-C or SIGTERM during training, after a checkpoint was saved."""

def loss_types(cfg):
    return [l.strip() for l in cfg.loss.split(",") if l.strip()]

def peak_lr(cfg):
    return cfg.lr or (3e-4 if cfg.model == "demo" else 5e-7)

def weights_dtype(cfg):
    return torch.bfloat16 if cfg.weights == "bf16" else torch.float32

# --- Losses: pure functions of per-pair summed log-probs, each (B,). Derived in tutorial.ipynb, sections 1-4

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
        focal = torch.exp(gamma * log_p)  # p^γ as exp(γ log p): no under/overflow
        losses = -(focal.detach() if focal_detach else focal) * log_p
    elif loss_type == "minordpo":
        # torch.where, not clamp: at r_l = 0 (every pair at step 0) the rejected branch has zero gradient, 1[r_l > 0]
        r_l_pos = torch.where(r_l > 0, r_l, torch.zeros_like(r_l))
        losses = -F.logsigmoid(beta * (r_w - r_l_pos))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSSES}")
    return losses, beta * r_w.detach(), beta * r_l.detach()

# --- Log-probs: summed over the response tokens only (pitfalls 5, 7)

def _token_logps(head, x, targets):
    """log π(target | prefix) at N positions: the output layer (or none, for logits), an fp32 log-softmax."""
    return -F.cross_entropy(head(x).float(), targets, reduction="none")  # (N,)

def sequence_logps(model, batch, chunk_size=2048):
    """Summed response-token log-probs per row, (2B,) float64, and the response tokens per row, (2B,).

    Position t predicts token t+1, so t is scored when token t+1 is a response token (collate lists them). Token
    log-probs are fp32, in chunks recomputed in backward; sums are float64 (DPO subtracts them). The model's own
    forward, or, where prepare_model found it gives the same numbers, the fast path: no mask (right padding: no scored
    position sees a pad), and the output layer at the scored positions only."""
    ids, positions = batch["input_ids"], batch["positions"]  # (2B, T), (N,) flat indices into (2B * T)
    if getattr(model, "fast_logps", False):
        out, head = model.base_model(input_ids=ids).last_hidden_state, model.get_output_embeddings()  # (2B, T, H)
    else:
        out, head = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, torch.nn.Identity()
    x = out.reshape(-1, out.shape[-1]).index_select(0, positions)  # (N, H) hidden states or (N, V) logits
    targets = ids.view(-1).index_select(0, positions + 1)  # (N,) the token each position predicts
    pieces = []
    for i in range(0, x.shape[0], chunk_size):
        args = (head, x[i:i + chunk_size], targets[i:i + chunk_size])
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _token_logps(*args))
    logps = torch.zeros(ids.shape[0], device=x.device, dtype=torch.float64)
    return logps.index_add(0, batch["position_seq"], torch.cat(pieces).double()), batch["n_tokens"]  # (2B,), (2B,)

def to_device(batch, device):
    """Host batch -> device; on CUDA through pinned memory, so the CPU does not wait."""
    cuda = device.type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}

@torch.no_grad()
def score(model, batches, n_pairs, device):
    """(n_pairs, 2) float64 on the host: log π(y_w|x), log π(y_l|x) of the collated pairs, by index."""
    model.eval()
    logps = torch.full((n_pairs, 2), -math.inf, dtype=torch.float64, device=device)
    for batch in my_share(batches):
        with autocast(device):
            lp, _ = model_logps(model, to_device(batch, device))
        logps[batch["idx"].to(device)] = lp.view(2, -1).T  # (B, 2): chosen, rejected
    reshard(model)
    return all_reduce(logps, "max").cpu()  # several processes: each scored its share

# --- Reference log-probs: one no-grad pass with the initial weights, cached; no reference model is kept (pitfall 9)

@torch.no_grad()
def weights_fingerprint(model):
    """A cheap digest of the weights (two sums per tensor), enough to tell one checkpoint from another."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        x = (p.full_tensor() if hasattr(p, "full_tensor") else p).float()  # FSDP: gather the shards
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{x.sum().item():.9e}{x.abs().sum().item():.9e}".encode())
    return h.hexdigest()[:16]

def fields_key(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

def cache_key(cfg, model, train_pairs, eval_pairs, device):
    """A hash of all that changes the values: the model and its weights, every pair's tokens and response start
    (data, tokenizer, template, lengths), the forward's device, dtype and path."""
    data = hashlib.sha256()
    for pairs in (train_pairs, eval_pairs):
        for p in pairs:
            data.update(p.chosen.numpy().tobytes() + p.rejected.numpy().tobytes())
            data.update(f"{p.chosen_start},{p.rejected_start};".encode())
        data.update(b"|")
    compute = [device.type, str(next(model.parameters()).dtype), "fast" if getattr(model, "fast_logps", 0) else "own"]
    fields = {"model": cfg.model, "weights": weights_fingerprint(model), "data": data.hexdigest()[:16],
              "n_train": len(train_pairs), "n_eval": len(eval_pairs), "compute": compute, "version": 4}
    return fields_key(fields), fields

def compute_reference(model, pairs, cfg, pad_id, device):
    """(N, 2) float64: log π_ref(y_w|x), log π_ref(y_l|x) per pair, by the policy's code path."""
    return score(model, scoring_batches(pairs, cfg.batch_size, pad_id), len(pairs), device)

def load_or_compute_reference(cfg, model, train_pairs, eval_pairs, pad_id, device, log=print):
    """The reference log-probs of the train and eval pairs, cached under cache_key."""
    key, fields = cache_key(cfg, model, train_pairs, eval_pairs, device)
    path = os.path.join(cfg.cache_dir, f"ref_{key}.pt")
    cached = read_cache(path, "reference", log)
    if agree(cached is not None, device, "min"):  # every process found it
        return cached["train"], cached["eval"]
    t0 = time.time()
    train_ref = compute_reference(model, train_pairs, cfg, pad_id, device)
    eval_ref = compute_reference(model, eval_pairs, cfg, pad_id, device)
    if rank() == 0:
        save_whole({"fields": fields, "tensors": {"train": train_ref, "eval": eval_ref}}, path)
    log(f"reference: computed log-probs of {len(train_pairs)}+{len(eval_pairs)} pairs in {time.time() - t0:.1f}s, "
        f"saved to {path}")
    return train_ref, eval_ref

# --- Data: rows, their format, and each row as (prompt, prompt+chosen, prompt+rejected) texts

def load_rows(cfg):
    """(train rows, held-out rows, format); a row is (dict, where it came from). Each row is checked against the
    first row's format, in file order."""
    if cfg.dataset == "demo":
        rows = [(r, f"demo pair {i}") for i, r in enumerate(make_demo_pairs(DEMO_PAIRS, cfg.seed), 1)]
        return rows[:4000], rows[4000:], "plain"
    train, heldout = (read_files(cfg.dataset), None) if is_local_data(cfg.dataset) else load_hub_rows(cfg.dataset)
    if cfg.eval_dataset:
        heldout = read_files(cfg.eval_dataset)
    fmt = detect_format(train)
    for row, where in train + (heldout or []):
        check_row(row, fmt, where)
    if heldout is None:  # hold out a seeded 5%
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, round(0.05 * len(train))) if len(train) > 1 else 0
        heldout, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    return train, heldout, fmt

def is_messages(x):
    return isinstance(x, list) and all(isinstance(m, dict) for m in x)

def detect_format(rows):
    """'plain', 'chat' (message lists) or 'implicit' (no prompt: chosen and rejected begin with it): the first row's."""
    if not rows:
        raise FocalpoError("the dataset is empty")
    first, where = rows[0]
    if not {"chosen", "rejected"} <= set(first):
        raise FocalpoError(f"{where}: expected columns 'chosen' and 'rejected' (and optionally 'prompt'), "
                           f"found: {', '.join(sorted(first)) or 'none'}")
    if any(is_messages(first.get(k)) for k in ("prompt", "chosen", "rejected")):
        return "chat"
    return "plain" if first.get("prompt") is not None else "implicit"

def common_prefix_len(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

def implicit_prompt(chosen, rejected):
    """hh-rlhf style: the common prefix, cut back to its last "Assistant:" (or its last whitespace)."""
    prefix = chosen[:common_prefix_len(chosen, rejected)]
    cut = prefix.rfind("Assistant:")
    if cut >= 0:
        return prefix[:cut + len("Assistant:")]
    cut = max(prefix.rfind(" "), prefix.rfind("\n"))
    return prefix[:cut + 1] if cut >= 0 else ""

def render_plain(row, fmt):
    """A plain row -> (prompt, prompt+chosen, prompt+rejected), or the reason to skip it."""
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = implicit_prompt(chosen, rejected) if fmt == "implicit" else row["prompt"]
    if fmt == "implicit":
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    return "chosen == rejected" if chosen == rejected else (prompt, prompt + chosen, prompt + rejected)

def render_chat(row, tokenizer):
    """A chat row -> the three texts through the chat template, or the reason to skip it. A string is a turn."""
    turn = lambda x, role: [{"role": role, "content": x}] if isinstance(x, str) else x
    prompt = turn(row.get("prompt"), "user")
    chosen, rejected = turn(row["chosen"], "assistant"), turn(row["rejected"], "assistant")
    if prompt is None:  # the turns chosen and rejected share (trl-lib/ultrafeedback_binarized)
        prompt = chosen[:common_prefix_len(chosen, rejected)]
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

# --- Tokenization (pitfalls 1-4, 6, 11): prompt+response as one string, prefix-checked, an explicit mask

@dataclass
class Pair:
    idx: int  # position in its split: indexes the reference log-probs
    chosen: torch.Tensor  # (Tc,) int32 token ids, prompt then response
    chosen_start: int  # first response token of chosen
    rejected: torch.Tensor  # (Tr,)
    rejected_start: int
    where: str = ""  # the file (or split) and row it came from

def uses_bos(tokenizer):
    """Does the tokenizer put a BOS token first? (Llama: yes; Qwen: no)"""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]

def tokenize_pairs(rows, fmt, tokenizer, cfg, stats):
    """(row, where) tuples -> Pairs; unusable rows are dropped and counted in `stats` (a Counter)."""
    add_bos, bos, eos = uses_bos(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    if fmt == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise FocalpoError("the data is conversational but the tokenizer has no chat template: use an "
                           "instruct/chat model's tokenizer, or plain-text prompt/chosen/rejected data")
    if fmt != "chat" and eos is None:
        raise FocalpoError("the tokenizer has no EOS token, needed to end plain-text responses")
    rendered = []
    for row, where in rows:
        r = render_chat(row, tokenizer) if fmt == "chat" else render_plain(row, fmt)
        if isinstance(r, str):
            stats[r] += 1
        else:
            rendered.append((where, r))
    # add_special_tokens=False: BOS is decided once below; a chat template that writes "<s>" has it (pitfall 2)
    ids = tokenizer([t for _, r in rendered for t in r], add_special_tokens=False)["input_ids"] if rendered else []
    pairs = []
    for k, (where, _) in enumerate(rendered):
        prompt, seqs = ids[3 * k], ids[3 * k + 1: 3 * k + 3]
        if add_bos and (not prompt or prompt[0] != bos):
            prompt, seqs = [bos] + prompt, [[bos] + s for s in seqs]
        out, reason = [], None
        for full in seqs:
            n = common_prefix_len(prompt, full)
            if n < len(prompt):  # a token merged across the boundary (pitfall 1): the response starts where they part
                stats["boundary token merged"] += 1
            p, resp = full[:n], full[n:]
            if fmt != "chat":
                resp = resp + [eos]  # teach the model to stop; chat templates close the turn themselves
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
    """(train pairs, eval pairs); the log says why rows were dropped or cut."""
    train_rows, eval_rows, fmt = load_rows(cfg)
    out = []
    for name, rows, most in (("train", train_rows, cfg.max_train_pairs), ("eval", eval_rows, cfg.max_eval_pairs)):
        rows, stats = rows[:most or None], collections.Counter()
        pairs = tokenize_pairs(rows, fmt, tokenizer, cfg, stats)
        notes = ", ".join(f"{v} {k}" for k, v in sorted(stats.items()))
        log(f"data: {name}: {len(pairs)} pairs from {len(rows)} rows ({fmt} format){'; ' + notes if notes else ''}")
        if not pairs:
            raise FocalpoError(f"no usable {name} pairs are left after filtering ({notes or 'no rows'}): "
                               f"check the data, or raise --max_length / --max_prompt_length")
        out.append(pairs)
    if steps_per_epoch(cfg, len(out[0])) == 0:
        raise FocalpoError(f"{len(out[0])} training pairs do not fill one step of --grad_accum={cfg.grad_accum} "
                           f"micro-batches of --batch_size={cfg.batch_size}: lower them")
    return out[0], out[1]

def collate_sequences(seqs, starts, pad_id):
    """Right-padded rows (pitfall 6), an explicit response mask (pitfall 4) and the scored positions (t scores
    token t+1), found on the host: the forward pass needs no nonzero() (a GPU -> CPU wait)."""
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
    """B pairs -> 2B rows (the chosen, then the rejected) and each pair's index in its split."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs],
                              [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs], pad_id)
    return dict(batch, idx=torch.tensor([p.idx for p in pairs]))

def scoring_batches(pairs, batch_size, pad_id):
    """Collated batches sorted by length, for a no-grad pass (the reference, evaluation)."""
    return [collate(b, pad_id) for b in length_grouped_batches(pairs, batch_size, 0, shuffle=False)]

def length_grouped_batches(pairs, batch_size, seed, shuffle=True):
    """Batches of similar length: shuffle, sort within windows of 64 batches, shuffle the batches. Unshuffled:
    sorted by length (scoring)."""
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

# --- Model and tokenizer

def pick_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CUDA_VISIBLE_DEVICES= for the CPU

def autocast(device):
    """bf16 autocast on CUDA (weights stay fp32); nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

def load_tokenizer(cfg):
    if cfg.model == "demo":
        return make_demo_tokenizer()
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(cfg.model)
    except Exception as e:
        raise load_error("the tokenizer of", cfg.model, e) from None
    if tok.pad_token_id is None:  # padding is masked explicitly, so any id will do
        if tok.eos_token_id is None:
            raise FocalpoError(f"the tokenizer of {cfg.model!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok

def load_model(cfg, tokenizer):
    """The weights in their dtype, with the attention the model picks."""
    if cfg.model == "demo":
        return make_demo_model(tokenizer, cfg.seed)
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=weights_dtype(cfg))
    except Exception as e:
        raise load_error("model", cfg.model, e) from None

def prepare_model(model, cfg, device):
    """Dropout off (pitfall 8: it makes the policy differ from the reference at step 0), optional gradient
    checkpointing, the device; then the fast log-prob path, where it gives the model's own numbers."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = model.to(device, weights_dtype(cfg))
    use_fast_logps(model, cfg.max_length, device)
    return model

# --- Metrics: summed over pairs, averaged at the end, so a mean over micro-batches is exact

def loss_and_metrics(logps, n_tokens, ref, cfg, loss_type):
    """Per-pair losses (B,) and the batch's metrics as SUMS over pairs, left on the device (reading each would make
    the CPU wait for the GPU ~15 times). logps, n_tokens: (2B,), chosen first; ref: (B, 2)."""
    B = ref.shape[0]
    pc, pr, nc, nr = logps[:B], logps[B:], n_tokens[:B], n_tokens[B:]
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, ref[:, 0], ref[:, 1], loss_type=loss_type,
                                                               beta=cfg.beta, gamma=cfg.gamma,
                                                               focal_detach=cfg.focal_detach)
    pc, pr = pc.detach(), pr.detach()
    ref_right = ref[:, 0] >= ref[:, 1]  # the reference already ranks the pair correctly (FocalPO's split)
    ranked = pc >= pr  # ranking accuracy, Chen et al. 2024 Def. 2.3: raw likelihoods, ties count as right
    win = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    count = lambda x: x.float().sum()
    return losses, {
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
    """The sums as floats, in one device -> host copy (one wait), summed over the processes."""
    keys = sorted(total)
    if not keys:
        return {}
    device = next((v.device for v in total.values() if torch.is_tensor(v)), torch.device("cpu"))
    if world() > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    values = torch.stack([torch.as_tensor(total[k], dtype=torch.float32, device=device) for k in keys])
    return dict(zip(keys, all_reduce(values).tolist()))

def finish_metrics(total):
    """Sums -> means; the ref-split accuracies within their group (None when it is empty)."""
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

# --- One optimizer step, and evaluation

def lr_at(step, total_steps, cfg, peak):
    """Linear warm-up from 0, then cosine decay to 0."""
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)))

def make_optimizer(model, cfg, lr, device):
    """AdamW; for bf16 weights AdamWSR: plain AdamW loses DPO-sized updates to bf16 rounding (pitfall 12)."""
    if cfg.weights == "bf16":
        return AdamWSR(model.parameters(), lr=lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                             fused=device.type == "cuda")

def forward_pairs(model, batch, ref, cfg, loss_type, device):
    """One micro-batch through the policy: per-pair losses (B,) and the batch's summed metrics."""
    batch = to_device(dict(batch, ref=ref[batch["idx"]]), device)  # (B, 2): indexed on the host, copied with it
    with autocast(device):
        logps, n_tokens = model_logps(model, batch)  # (2B,), (2B,): chosen first, then rejected
    return loss_and_metrics(logps, n_tokens, batch["ref"], cfg, loss_type)

def train_step(model, optimizer, micro_batches, ref, cfg, loss_type, device, n_pairs=None):
    """One optimizer step over a list of micro-batches (gradient accumulation). Returns summed metrics (on the
    device), or {"nonfinite_pairs": [...]} (indices into the split) when a loss or the gradient is NaN/inf: then no
    update is made. The CPU waits for the GPU once. n_pairs: the whole step's (several processes share a step)."""
    n_pairs = n_pairs or sum(len(b["idx"]) for b in micro_batches)
    total, all_losses = {}, []
    for i, batch in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce the gradients once, after the last one
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        losses, metrics = forward_pairs(model, batch, ref, cfg, loss_type, device)
        # gradients ADD across micro-batches: each adds its SUM over pairs over the step's pairs, so the gradient
        # is the mean over the step's pairs however they were split (pitfall 10)
        (losses.sum() / n_pairs).backward()
        add_metrics(total, metrics)
        all_losses.append(losses.detach())
    # the norm before clipping; with max_norm = inf it only measures
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the global norm, as a plain tensor
    finite = torch.isfinite(torch.cat(all_losses)).all() & torch.isfinite(norm)
    if not agree(finite, device, "min"):  # the step's one wait
        optimizer.zero_grad(set_to_none=True)  # a NaN/inf would poison every weight it touches: no update
        return {"nonfinite_pairs": nonfinite_pairs(micro_batches, all_losses)}
    total["grad_norm"] = norm * total["pairs"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total

class HeldOut:
    """The held-out pairs, batched once, with their reference. Calling it evaluates a model for the run's loss:
    one scoring pass, and for the demo the accuracy of greedy generation."""

    def __init__(self, pairs, ref, tokenizer, cfg):
        self.pairs, self.ref, self.tokenizer = pairs, ref, tokenizer
        self.batches = scoring_batches(pairs, cfg.batch_size, tokenizer.pad_token_id)
        self.n_tokens = torch.tensor([len(p.chosen) - p.chosen_start for p in pairs] +
                                     [len(p.rejected) - p.rejected_start for p in pairs])

    def __call__(self, model, cfg, loss_type, device):
        logps = score(model, self.batches, len(self.pairs), device)  # (N, 2)
        _, m = loss_and_metrics(logps.T.reshape(-1), self.n_tokens, self.ref, cfg, loss_type)
        out = finish_metrics({k: float(v) for k, v in m.items()})
        if cfg.dataset == "demo":
            out["generation_accuracy"] = generation_accuracy(model, self.pairs, self.tokenizer, device)
        model.train()
        return out

# --- Training: the loop and its helpers

def steps_per_epoch(cfg, n_pairs):
    return math.ceil(n_pairs / cfg.batch_size) // cfg.grad_accum

def step_stream(train_pairs, cfg, skip):
    """Endless seeded steps of --grad_accum micro-batches, reshuffled each epoch. An epoch's last batches, too few
    for a step, are left out (as in nanoGPT): each process always has its share. A resumed run skips its steps."""
    epoch, n = 0, 0
    while True:
        batches = length_grouped_batches(train_pairs, cfg.batch_size, cfg.seed + epoch)
        for i in range(0, steps_per_epoch(cfg, len(train_pairs)) * cfg.grad_accum, cfg.grad_accum):
            if n >= skip:
                yield batches[i:i + cfg.grad_accum]
            n += 1
        epoch += 1

def next_step(steps, pad_id):
    """This process's share of the next step's micro-batches (collated), the step's pairs and tokens (no pads)."""
    step = next(steps)
    pairs = [p for b in step for p in b]
    tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    return [collate(b, pad_id) for b in my_share(step)], len(pairs), tokens

def append_row(path, row):
    """One line of metrics.jsonl, written at once, by rank 0."""
    if rank() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

def new_state():
    """What a resumed run needs besides weights, optimizer and RNG."""
    return {"step": 0, "tokens_seen": 0, "train_seconds": 0.0, "elapsed": 0.0, "window": {}, "bad_steps": 0,
            "first_eval": None, "last_eval": None}

def train_row(state, step, lr):
    """The metrics.jsonl row of the steps since the last one (their one wait)."""
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
    pad_id, label = tokenizer.pad_token_id, f"[{loss_type}]"
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch(cfg, len(train_pairs))
    optimizer = make_optimizer(model, cfg, peak_lr(cfg), device)
    saver = Checkpoints(os.path.join(out_dir, "checkpoints"), model, optimizer, cfg, loss_type)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    state = saver.resume(metrics_path, total_steps, log) if cfg.resume else new_state()
    model.train()
    if state["first_eval"] is None:
        if rank() == 0:
            open(metrics_path, "w").close()  # a new run: a new metrics file
        state["first_eval"] = state["last_eval"] = ev = held_out(model, cfg, loss_type, device)
        append_row(metrics_path, {"step": 0, "split": "eval", **ev})
        log(eval_line(label, 0, ev))
    steps = step_stream(train_pairs, cfg, skip=state["step"])
    bar = tqdm(total=total_steps, initial=state["step"], desc=loss_type, dynamic_ncols=True, leave=False,
               disable=not cfg.progress or rank() != 0)
    say = log if bar.disable else bar.write  # log lines above the bar, not through it
    t_start, elapsed_before = time.time(), state["elapsed"]
    with StopSignals() as stop, bar:
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
            if "nonfinite_pairs" in m:  # no update was made
                skip_nonfinite_step(state, [train_pairs[i].where for i in m["nonfinite_pairs"]], saver,
                                    lambda msg: say(f"{label} {msg}"))
            else:
                state["bad_steps"], state["tokens_seen"] = 0, state["tokens_seen"] + n_tokens
                add_metrics(state["window"], m)  # still on the device
            bar.update(1)
            if (step % cfg.log_every == 0 or step == total_steps) and state["window"]:
                row = train_row(state, step, lr)
                append_row(metrics_path, row)
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

def loss_dir(cfg, loss_type):
    """--out_dir for one loss, --out_dir/<loss> for several."""
    return cfg.out_dir if len(loss_types(cfg)) == 1 else os.path.join(cfg.out_dir, loss_type)

def run(cfg, log=print):
    """The whole job: data, reference, then each loss from the same initial weights. Returns {loss_type: summary}.
    Under torchrun every process runs this; rank 0 logs and writes the files."""
    t0, device = time.time(), setup_processes(cfg)
    log = log if rank() == 0 else (lambda msg: None)
    with check_before_work(cfg, device, log) as finished:  # mistakes cost one sentence; out_dir is ours until done
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg)
        train_pairs, eval_pairs = prepare_data(cfg, tokenizer, log)
        summaries, refs = {}, None
        for loss_type in loss_types(cfg):
            out_dir = loss_dir(cfg, loss_type)
            if loss_type in finished:  # --resume of a finished run, with the same options (checked)
                log(f"[{loss_type}] already finished in {out_dir}: skipped (delete its summary.json to train it again)")
                summaries[loss_type] = finished[loss_type]
                continue
            model = prepare_model(load_model(cfg, tokenizer), cfg, device)  # each loss from the same weights
            if cfg.model == "demo" and cfg.sft_steps:  # as a real model would come SFT'd
                with rank0_first():  # several processes: rank 0 trains and caches it, the others load the cache
                    model = sft_demo(model, tokenizer, cfg, device, log)
            model = shard_model(model, device)
            if refs is None:
                log(f"model: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
                    f"{device.type}" + (f", sharded over {world()} processes (FSDP2)" if world() > 1 else ""))
            # the key holds a fingerprint of the weights just loaded: each loss checks it starts from the reference's
            first, refs = refs is None, load_or_compute_reference(cfg, model, train_pairs, eval_pairs,
                                                                  tokenizer.pad_token_id, device, log)
            if first:
                right = int((refs[1][:, 0] >= refs[1][:, 1]).sum())
                log(f"reference: ranks {right} of {len(eval_pairs)} held-out pairs right (π_ref(y_w|x) >= "
                    f"π_ref(y_l|x)) and {len(eval_pairs) - right} wrong")
            held_out = HeldOut(eval_pairs, refs[1], tokenizer, cfg)
            state = train(cfg, model, tokenizer, train_pairs, held_out, refs[0], loss_type, device, out_dir, log)
            if cfg.save_model:
                save_model(model, tokenizer, out_dir)
            summaries[loss_type] = write_summary(cfg, state, loss_type, (len(train_pairs), len(eval_pairs)), out_dir)
            if not cfg.keep_final_checkpoint and rank() == 0:  # the optimizer state (~3x the model) goes
                shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
            show_generations(model, eval_pairs, tokenizer, cfg, device, f"[{loss_type}]", log)
    log(comparison_table(summaries))
    log(f"done in {time.time() - t0:.0f}s; metrics and models in {cfg.out_dir}/")
    return summaries

def main(argv=None):
    """The command line: an error the user can fix ends in one sentence and exit code 2."""
    try:
        run(parse_args(argv))
        code = 0
    except BaseException as e:
        code = exit_code(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)

# =============================================================================
# Appendix: optional machinery
# A first reading can stop here. What follows: the command line, the checks before any work, data files, the demo,
# the fast log-prob path, the memory plan, bf16 AdamW, checkpoints, output, faults, several processes.

# --- The command line

def _parse_bool(s):
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")

def option_help():
    """{option: explanation}, from the comments of Config."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read().split("\nclass Config:")[1].split("\nLOSSES = ")[0]
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", source, flags=re.M))

# TRL's DPOConfig and transformers' TrainingArguments names: a user who types one is told ours
FAMILIAR = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "num_train_epochs": "epochs",
            "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "output_dir": "out_dir",
            "logging_steps": "log_every", "eval_steps": "eval_every", "save_steps": "save_every",
            "resume_from_checkpoint": "resume", "model_name_or_path": "model", "dataset_name": "dataset",
            "loss_type": "loss", "disable_tqdm": "progress"}

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence, not the usage of every option
        raise FocalpoError(f"{message} (python focalpo.py --help lists every option)")

def parse_args(argv=None):
    """--key=value for every Config field (a bare --flag means true). A mistake is one sentence."""
    parser = _Parser(description=__doc__.split("Reading guide")[0], allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = option_help()
    for f in dataclasses.fields(Config):
        kind = {"type": _parse_bool, "nargs": "?", "const": True} if f.type is bool else {"type": f.type}
        parser.add_argument(f"--{f.name}", default=f.default, metavar=f.type.__name__.upper(),
                            help=helps[f.name].replace("%", "%%") + f" (default: {f.default!r})", **kind)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib
        name = unknown[0].split("=")[0].lstrip("-")
        near = FAMILIAR.get(name) or next(iter(difflib.get_close_matches(name, helps, n=1)), None)
        hint = (f"; that is TRL's and the HF Trainer's name, here it is --{near}" if name in FAMILIAR else
                f"; did you mean --{near}?" if near else "")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    cfg = Config(**vars(args))
    check_config(cfg)
    return cfg

AT_LEAST_1 = ("batch_size", "grad_accum", "epochs", "max_length", "max_prompt_length", "eval_every", "log_every",
              "dist_timeout")

def check_config(cfg):
    """Each option's value on its own."""
    losses = loss_types(cfg)
    if "sigmoid" in losses:
        raise FocalpoError("--loss=sigmoid is TRL's name for DPO: here it is --loss=dpo")
    if not losses or not set(losses) <= set(LOSSES):
        raise FocalpoError(f"--loss={cfg.loss!r}: each loss must be one of {', '.join(LOSSES)} (the README shows how "
                           f"to add your own)")
    if cfg.weights not in ("fp32", "bf16"):
        raise FocalpoError(f"--weights={cfg.weights!r}: expected fp32 or bf16")
    if cfg.beta <= 0 or cfg.warmup_ratio >= 1:
        raise FocalpoError(f"--beta={cfg.beta}: must be above 0" if cfg.beta <= 0 else
                           f"--warmup_ratio={cfg.warmup_ratio}: must be below 1")
    for f in dataclasses.fields(Config):
        value, least = getattr(cfg, f.name), -1 if f.name == "generate" else int(f.name in AT_LEAST_1)
        if f.type in (int, float) and not (math.isfinite(value) and value >= least):
            raise FocalpoError(f"--{f.name}={value}: must be a finite number, at least {least}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise FocalpoError(f"--max_prompt_length={cfg.max_prompt_length} leaves no room for a response within "
                           f"--max_length={cfg.max_length}: make it smaller")

# --- Before any work: folders, one run per folder, earlier runs, data files, the model's config and memory

@contextlib.contextmanager
def check_before_work(cfg, device, log):
    """The checks that can come before the data, the SFT stage and the reference pass. out_dir stays locked while
    the block runs (one run per folder); yields the summaries of the losses --resume finds finished."""
    import fcntl
    check_config(cfg)
    for name in ("out_dir", "cache_dir"):
        try:
            os.makedirs(getattr(cfg, name), exist_ok=True)
            tempfile.TemporaryFile(dir=getattr(cfg, name)).close()
        except OSError as e:
            raise FocalpoError(f"--{name}={getattr(cfg, name)} is not a folder that can be written ({e.strerror}): "
                               f"choose another") from None
    with open(os.path.join(cfg.out_dir, ".lock"), "a") as lock:
        try:
            if rank() == 0:  # the system lets go when the file closes, however the process ends
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        if not agree(free, device, "min"):
            raise FocalpoError(f"another run is using {cfg.out_dir} now: wait for it to end, or pass another "
                               f"--out_dir")
        finished = {lt: s for lt in loss_types(cfg) if (s := check_earlier_run(cfg, lt)) is not None}
        for spec in (cfg.dataset, cfg.eval_dataset):
            if spec != "demo" and is_local_data(spec):
                data_paths(spec)
        if cfg.model != "demo":
            check_model(cfg, device, log)
        yield finished

def check_earlier_run(cfg, loss_type):
    """A new run needs a folder without results; --resume continues a run, finished or not, only with the options
    that made it. Returns a finished run's summary."""
    out_dir = loss_dir(cfg, loss_type)
    if not cfg.resume:
        found = [f for f in ("summary.json", "metrics.jsonl", "checkpoints") if os.path.exists(f"{out_dir}/{f}")]
        if found:
            raise FocalpoError(f"{out_dir} already holds a run's results ({', '.join(found)}): continue or show that "
                               f"run with --resume=true, or pass a new --out_dir")
        return None
    path = os.path.join(out_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        check_same_options(summary, cfg, loss_type, path)
        return summary
    ckpt, path = latest_checkpoint(os.path.join(out_dir, "checkpoints"))
    if ckpt is not None:
        check_same_options(ckpt, cfg, loss_type, path)

# What a resumed run shares with the run it resumes (how often it logs, evaluates and saves may change)
RESULT_OPTIONS = ("beta", "gamma", "focal_detach", "lr", "batch_size", "grad_accum", "epochs", "max_steps",
                  "warmup_ratio", "grad_clip", "seed", "model", "dataset", "eval_dataset", "max_train_pairs",
                  "max_eval_pairs", "max_length", "max_prompt_length", "weights", "sft_steps")

def check_same_options(recorded, cfg, loss_type, path):
    """One sentence naming each option that differs from those a checkpoint or summary recorded."""
    was = recorded.get("config") or {}
    diffs = [f"--{k} was {was.get(k)!r}, now {getattr(cfg, k)!r}" for k in RESULT_OPTIONS
             if was.get(k) != getattr(cfg, k)]
    if recorded["loss_type"] != loss_type:
        diffs.insert(0, f"the loss was {recorded['loss_type']!r}, now {loss_type!r}")
    if diffs:
        raise FocalpoError(f"--resume=true with options that change the result ({'; '.join(diffs)}) would not "
                           f"continue {path}: run with the original values, or start a new --out_dir")

def check_model(cfg, device, log):
    """The model's config loads, its context holds --max_length, and (on a GPU) the memory plan fits."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(cfg.model)
    except Exception as e:
        raise load_error("the config of", cfg.model, e) from None
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context and context < cfg.max_length:
        raise FocalpoError(f"--max_length={cfg.max_length} is longer than the {context} positions {cfg.model} was "
                           f"built for: lower --max_length (and --max_prompt_length) to at most {context}")
    check_memory(cfg, config, device, log)

def first_line(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}" if str(e).strip() else type(e).__name__

def load_error(what, name, e):
    """One sentence: what could not be loaded, the cause, and what to do."""
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        return FocalpoError(f"could not load {what} {name!r}: there is no such folder; check the path")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = (f"check that {name} holds what save_pretrained writes" if os.path.exists(name) else
            "check the name; HF_HUB_OFFLINE is set, so only the local cache is read; or pass a local path" if offline
            else "check the name and your network (set HF_HUB_OFFLINE=1 to fail at once), or pass a local path")
    return FocalpoError(f"could not load {what} {name!r} ({first_line(e)}): {hint}")

# --- Data files and the hub, read by datasets; each row with where it came from

def data_kind(path):
    """The datasets loader for a data file's name ("x.JSONL.gz": 'json'), or None."""
    name = re.sub(r"\.(gz|bz2|xz)$", "", path.lower())
    return {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(name)[1])

def is_local_data(spec):
    return any(data_kind(p) or os.path.exists(p) for p in spec.split(",") if p)

def data_paths(spec):
    """The comma-separated files, each checked to exist."""
    paths = [p for p in spec.split(",") if p]
    for path in paths:
        if not os.path.isfile(path):
            raise FocalpoError(f"data file {path} " + ("is a folder" if os.path.isdir(path) else "does not exist"))
    return paths

def read_files(spec):
    """[(row, where)] from .jsonl, .json, .csv (maybe .gz, .bz2, .xz) or .parquet files, read by datasets."""
    import datasets
    rows = []
    for path in data_paths(spec):
        if data_kind(path) is None:
            raise FocalpoError(f"{path}: not a data file this reads; use .jsonl, .json or .csv (each may be .gz, "
                               f".bz2 or .xz compressed), or .parquet")
        try:
            table = datasets.load_dataset(data_kind(path), data_files=path, split="train").to_list()
        except Exception as e:  # the library's own words, from the error under its error
            raise FocalpoError(f"could not read {path} ({first_line(e.__cause__ or e)}): fix the file, or give it "
                               f"the name of what it holds") from None
        rows += [(row, f"{path} row {i}") for i, row in enumerate(table, 1)]
    return rows

def load_hub_rows(name):
    """(train rows, held-out rows or None): the 'train[_prefs]' split, and 'test[_prefs]' or 'validation' if any."""
    import datasets
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # network errors, unknown names, gated datasets: all end up here
        raise load_error("dataset", name, e) from None
    train, test = (next((s for s in names if s in ds), None)
                   for names in (("train", "train_prefs"), ("test", "test_prefs", "validation")))
    if train is None:
        raise FocalpoError(f"dataset {name!r} has no 'train' or 'train_prefs' split (it has: {', '.join(ds)}): save "
                           f"the split you want with to_json() and pass the file")
    rows = lambda split: [(r, f"dataset {name!r} split {split!r} row {i}") for i, r in enumerate(ds[split], 1)]
    return rows(train), rows(test) if test else None

def check_row(row, fmt, where):
    """The first row's format, or one sentence naming the row (chat rows may mix strings and message lists)."""
    for name in ("chosen", "rejected") if fmt == "implicit" else ("prompt", "chosen", "rejected"):
        x = row.get(name)
        if fmt != "chat" and not isinstance(x, str):
            raise FocalpoError(f"{where}: {name!r} should be a string, as in the first row ({fmt} format), found "
                               f"{type(x).__name__}; a file holds one format: plain (prompt, chosen, rejected "
                               f"strings), chat (message lists) or implicit (chosen, rejected strings only)")
        if fmt == "chat" and not (isinstance(x, str) or is_messages(x) or (name == "prompt" and x is None)):
            raise FocalpoError(f"{where}: {name!r} should be a list of {{role, content}} messages or a string, "
                               f"found {type(x).__name__}")
        for m in x if is_messages(x) else []:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise FocalpoError(f"{where} {name!r}: each message needs a 'role' and a string 'content', "
                                   f"found {m!r:.80}")

# --- The demo: a letter-sorting task whose answers can be checked, an SFT stage, generation accuracy

DEMO_LETTERS = "abcdefghijklmnopqrstuvwxyz"
DEMO_PAIRS = 4400  # 4000 to train on, 400 held out

def demo_mistake(answer, letters, rng):
    """One plausible mistake: two neighbours swapped, or a letter not in the prompt put in (then re-sorted)."""
    answer = list(answer)
    i = rng.randrange(len(answer) - 1)
    if rng.random() < 0.5:
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    else:
        answer[i] = rng.choice([c for c in DEMO_LETTERS if c not in letters and c not in answer])
        answer.sort()
    return answer

def make_demo_pairs(n, seed):
    """n pairs with distinct prompts, like {"prompt": "sort: q d m a =", "chosen": " a d m q", "rejected": " a m d q"}:
    half right vs wrong, half less wrong (one mistake) vs more wrong (two): as in real data, the preferred response
    is often only the better of two imperfect ones."""
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
    """The right answer to a demo prompt ("sort: q d m a =" -> "a d m q")."""
    return " ".join(sorted(w for w in prompt.split() if len(w) == 1 and w in DEMO_LETTERS))

def make_demo_tokenizer():
    """A word-level tokenizer (one token per letter or word), built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(DEMO_LETTERS) + ["sort", ":", "="])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")

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
    """Correct sortings of letter sets no preference pair uses."""
    letters = lambda row: frozenset(row["prompt"].split()[1:-1])
    taken = {letters(r) for r in make_demo_pairs(DEMO_PAIRS, cfg.seed)}
    rows = [r for r in make_demo_pairs(SFT_EXAMPLES + 500, cfg.seed + 1) if letters(r) not in taken]
    return [(r["prompt"], " " + demo_answer(r["prompt"])) for r in rows[:SFT_EXAMPLES]]

def sft_demo(model, tokenizer, cfg, device, log=print):
    """--sft_steps of next-token training on correct sortings, stopped early: the model (the reference and every
    loss's start) sorts some held-out prompts right and many wrong. Cached like the reference."""
    rows = make_sft_rows(cfg)  # the word-level tokenizer has no boundary merges (cf. tokenize_pairs)
    prompts = tokenizer([p for p, _ in rows])["input_ids"]
    answers = tokenizer([a for _, a in rows], add_special_tokens=False)["input_ids"]
    seqs = [torch.tensor(p + a + [tokenizer.eos_token_id], dtype=torch.int32) for p, a in zip(prompts, answers)]
    starts = [len(p) for p in prompts]
    data = hashlib.sha256(b"".join(s.numpy().tobytes() + bytes([n]) for s, n in zip(seqs, starts)))
    fields = {"stage": "sft", "init": weights_fingerprint(model), "data": data.hexdigest()[:16], "steps": cfg.sft_steps,
              "lr": SFT_LR, "batch": SFT_BATCH, "compute": f"{device.type}/{next(model.parameters()).dtype}",
              "version": 1}
    path = os.path.join(cfg.cache_dir, f"sft_{fields_key(fields)}.pt")
    if (cached := read_cache(path, "sft", log)) is not None:
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
    save_whole({"fields": fields, "tensors": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    log(f"sft: {cfg.sft_steps} steps of {SFT_BATCH} correct sortings (from {len(seqs)}, no letter set shared with a "
        f"preference pair) in {time.time() - t0:.1f}s, final loss {loss.item():.3f}; saved to {path}")
    return model

@torch.no_grad()
def greedy_completions(model, prompts, tokenizer, device, max_new_tokens, batch_size=256):
    """(text up to the first EOS, whether one came) per prompt; prompts of one length share a batch: no padding."""
    was_training, eos = model.training, tokenizer.eos_token_id
    out, by_length = [None] * len(prompts), {}
    model.eval()
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    room = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    for group in by_length.values():
        for k in range(0, len(group), batch_size):
            idx = group[k:k + batch_size]
            ids = torch.stack([torch.as_tensor(prompts[i]) for i in idx]).long().to(device)
            with autocast(device):
                new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                     max_new_tokens=min(max_new_tokens, room - ids.shape[1]), eos_token_id=eos,
                                     pad_token_id=tokenizer.pad_token_id,
                                     synced_gpus=world() > 1)[:, ids.shape[1]:]  # FSDP: every process, every step
            for i, row in zip(idx, new.tolist()):
                end = row.index(eos) if eos in row else len(row)
                out[i] = (tokenizer.decode(row[:end], skip_special_tokens=True), end < len(row))
    reshard(model)
    model.train(was_training)
    return out

def expected_answer(pair, tokenizer):
    """The right answer to the pair's prompt (its chosen answer may have a mistake)."""
    return demo_answer(tokenizer.decode(pair.chosen[:pair.chosen_start], skip_special_tokens=True))

def is_right(pair, completion, tokenizer):
    """A greedy completion (text, ended with EOS) is exactly the right answer, then stops."""
    return completion[1] and completion[0].strip() == expected_answer(pair, tokenizer)

def generation_accuracy(model, pairs, tokenizer, device):
    """The fraction of greedy completions that are exactly the right answer, then EOS. One token past the longest
    answer is allowed: a completion that runs on shows as one."""
    longest = max(len(p.chosen) - p.chosen_start for p in pairs)
    got = greedy_completions(model, [p.chosen[:p.chosen_start] for p in pairs], tokenizer, device, longest + 1)
    return sum(is_right(p, c, tokenizer) for p, c in zip(pairs, got)) / len(pairs)

def show_generations(model, pairs, tokenizer, cfg, device, label, log, max_new_tokens=128):
    """--generate=N: the first N held-out prompts with greedy completions (for the demo: right or not)."""
    pairs = pairs[:cfg.generate if cfg.generate >= 0 else (5 if cfg.dataset == "demo" else 0)]
    got = greedy_completions(model, [p.chosen[:p.chosen_start] for p in pairs], tokenizer, device, max_new_tokens)
    for p, (text, ended) in zip(pairs, got):
        prompt = tokenizer.decode(p.chosen[:p.chosen_start], skip_special_tokens=True)
        line = f"{label} {prompt[-200:]!r} -> {text!r}{'' if ended else ' (no EOS)'}"
        if cfg.dataset == "demo":
            right = is_right(p, (text, ended), tokenizer)
            line += "   right" if right else f"   wrong: expected {expected_answer(p, tokenizer)!r}"
        log(line)

# --- The fast log-prob path, used only where it gives the model's own numbers

def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, given no mask: causal for several queries, full for one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)

def use_fast_logps(model, max_length, device):
    """The fast path drops the attention mask (wrong under a window shorter than max_length, or for attention other
    than SDPA's) and takes logits straight from the output layer (wrong where a model scales or caps them). So it is
    tried on SDPA models without a short window, and kept only if on a probe, two random right-padded sequences with
    logits as large as a trained model's (a cap shows), it gives the model's own log-probs."""
    from transformers import AttentionInterface
    window, head = getattr(model.config, "sliding_window", None), model.get_output_embeddings()
    model.fast_logps = False
    if model.config._attn_implementation != "sdpa" or head is None or (window is not None and window < max_length):
        return False
    length = min(64, max_length, getattr(model.config, "max_position_embeddings", None) or 64)
    vocab, seeded = model.get_input_embeddings().num_embeddings, torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (length,), generator=seeded)  # the global RNG is left as it was
    probe = to_device(collate_sequences([ids, ids[:length // 2]], [1, 1], pad_id=0), device)
    was_training, weight = model.training, head.weight.detach().clone()
    tol = 2e-2 if device.type == "cuda" or weight.dtype == torch.bfloat16 else 1e-4  # nats per token: rounding
    model.eval()
    AttentionInterface.register("causal_sdpa", _causal_sdpa)
    with torch.no_grad(), autocast(device):
        head.weight.mul_(max(1.0, 10 / float(model(probe["input_ids"]).logits.float().std())))  # logits' std: 10
        own, n = sequence_logps(model, probe)
        try:
            model.set_attn_implementation("causal_sdpa")
            model.fast_logps = True
            agrees = bool(((sequence_logps(model, probe)[0] - own).abs() <= tol * n).all())
        except Exception:  # parts that do not fit (a base_model that is the model itself, say)
            agrees = False
        head.weight.copy_(weight)
    if not agrees:
        model.set_attn_implementation("sdpa")
        model.fast_logps = False
    model.train(was_training)
    return model.fast_logps

# --- Memory plan (GPU only): will training fit? An estimate, not a measurement

GiB = 2 ** 30

def memory_plan(config, cfg, world_size=1):
    """(bytes needed per GPU, a one-line account). Per parameter: fp32 weights, gradients, AdamW moments and
    autocast's bf16 copy (18 bytes; 16 under FSDP), or 8 with --weights=bf16. A layer keeps ~30*H + 8*I bytes per
    token for backward; with checkpointing only its input, one layer recomputed at a time. Plus a logits chunk."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # parameters counted without memory
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    per = 8 if cfg.weights == "bf16" else (18 if world_size == 1 else 16)
    state, buffers = n * per / world_size, 28 * min(AdamWSR.chunk, n) if cfg.weights == "bf16" else 0
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = 2 * cfg.batch_size * cfg.max_length
    layer = (30 * H + 8 * I) * tokens
    inputs = (2 if cfg.weights == "bf16" else 4) * H * tokens * L
    acts = (inputs + layer if cfg.gradient_checkpointing else layer * L) + 2048 * config.vocab_size * 10
    line = (f"memory plan: {n / 1e9:.2f}B parameters x {per} bytes ({cfg.weights} training state)"
            + (f" / {world_size} processes" if world_size > 1 else "") + f" = {state / GiB:.1f} GiB"
            + (f" + optimizer buffers {buffers / GiB:.1f} GiB" if buffers else "")
            + f" + activations ~{acts / GiB:.1f} GiB ({cfg.batch_size} pairs x {cfg.max_length} tokens, gradient "
            f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'})"
            + f" = ~{(state + buffers + acts) / GiB:.1f} GiB")
    return state + buffers + acts, line

def check_memory(cfg, config, device, log=print):
    """On a GPU, before loading the model: print the plan beside the free memory; stop if it cannot fit."""
    if device.type != "cuda":
        return
    needed, line = memory_plan(config, cfg, world())
    free = torch.cuda.mem_get_info(device)[0]
    log(f"{line}; free on the GPU: {free / GiB:.1f} GiB")
    savers = ([] if cfg.weights == "bf16" else ["--weights=bf16"]) + \
             ([] if cfg.gradient_checkpointing else ["--gradient_checkpointing=true"])
    if needed > free:
        raise FocalpoError(f"training {cfg.model} needs about {needed / GiB:.1f} GiB but the GPU has "
                           f"{free / GiB:.1f} GiB free: " + (f"add {' and '.join(savers)}, or " if savers else "")
                           + "lower --batch_size (raising --grad_accum) or --max_length, or use more GPUs (torchrun)")

# --- --weights=bf16 (pitfall 12): AdamW with fp32 math, stochastic rounding back to bf16

def stochastic_round_bf16_(x, noise):
    """A flat fp32 tensor -> bf16 that is x in expectation, as a view of x's top halves (x is changed). noise: int32
    in [0, 2^16), like x. bf16 is an fp32's top 16 bits: 16 random bits added to the low half carry into the top
    half with probability (x - the bf16 below) / spacing. Both signs work: the pattern is sign + magnitude, and the
    addition only ever grows the magnitude."""
    x.view(torch.int32).add_(noise)
    return x.view(torch.int16).view(-1, 2)[:, 1].view(torch.bfloat16)  # little-endian: the second int16 is the top

class AdamWSR(torch.optim.Optimizer):
    """AdamW (no weight decay) with its state in the parameters' dtype (bf16: 6 bytes per weight, not 12), fp32
    arithmetic and stochastic rounding back: round-to-nearest loses a step of lr = 5e-7 on a bf16 weight of 0.02
    (spacing 1.2e-4) every time; stochastic rounding moves it the right amount on average. Parameters go in pieces of
    `chunk` elements through reusable buffers (28 bytes each: 0.94 GiB); one int64 of random bits per element serves
    three roundings (bits 0-15 the weight, 16-31 and 32-47 the moments; three draws took 1.3x as long on a CPU).
    Under FSDP2: the local shard."""

    chunk = 1 << 25

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.work = {}  # the reusable buffers, made on the first step

    def random_bits(self, n, device):
        """n int64s with (at least) 48 random low bits; a method, so that tests can supply fixed bits."""
        return self.buffer("bits", n, torch.int64, device).random_()

    def buffer(self, name, n, dtype, device):
        if name not in self.work or self.work[name].numel() < n or self.work[name].device != device:
            self.work[name] = torch.empty(n, dtype=dtype, device=device)
        return self.work[name][:n]

    @torch.no_grad()
    def step(self, closure=None):  # closure: unused, accepted because torch.distributed.checkpoint passes it
        for group in self.param_groups:
            for p in [p for p in group["params"] if p.grad is not None]:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] = int(state["step"]) + 1  # a Python int: no host sync per parameter
                tensors = [t.to_local() if hasattr(t, "to_local") else t for t in
                           (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for pieces in zip(*(t.view(-1).split(self.chunk) for t in tensors)):
                    self.update(*pieces, group, state["step"])

    def update(self, w_, g_, m_, v_, group, t):
        """One piece: weight, gradient and moments (flat, in their dtype) -> fp32, AdamW, rounded back."""
        (beta1, beta2), n, device = group["betas"], w_.numel(), w_.device
        w, g, m, v = (self.buffer(k, n, torch.float32, device).copy_(x) for k, x in zip("wgmv", (w_, g_, m_, v_)))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = torch.div(v, 1 - beta2 ** t, out=g).sqrt_().add_(group["eps"])  # g is no longer needed: reuse it
        w.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
        words = self.random_bits(n, device).view(torch.int32).view(n, 2)  # each int64 as two 32-bit words
        noise = self.buffer("noise", n, torch.int32, device)
        for k, (x, dst) in enumerate(((w, w_), (m, m_), (v, v_))):
            if dst.dtype != torch.bfloat16:
                dst.copy_(x)
                continue
            word = torch.bitwise_right_shift(words[:, 0], 16, out=noise) if k == 1 else words[:, k // 2]
            dst.copy_(stochastic_round_bf16_(x, torch.bitwise_and(word, 0xFFFF, out=noise)))

# --- Caches and checkpoints, written under a temporary name, then renamed: a file with its final name is whole

def save_whole(blob, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # a name of its own: two runs may share a cache folder
    torch.save(blob, tmp)
    os.replace(tmp, path)  # a crash mid-save leaves the file before it as it was

def read_cache(path, what, log):
    """The tensors cached in `path` (its name is their key), or None; a file that cannot be read is reported."""
    if not os.path.exists(path):
        return None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)["tensors"]
        log(f"{what}: loaded cached values from {path}")
        return tensors
    except Exception as e:
        log(f"{what}: WARNING: ignoring the cache file {path}: it cannot be read ({type(e).__name__}); recomputing it")

def latest_checkpoint(folder):
    """(the newest checkpoint, mapped, not read; its path) or (None, None); a damaged one is one sentence."""
    paths = sorted(glob.glob(os.path.join(folder, "step_*.pt")))
    if not paths:
        return None, None
    try:
        return torch.load(paths[-1], map_location="cpu", weights_only=True, mmap=True), paths[-1]
    except Exception as e:
        raise FocalpoError(f"checkpoint {paths[-1]} does not load ({first_line(e)[:200]}): delete it to resume from "
                           f"the one before, or start a new --out_dir") from None

class Checkpoints:
    """step_NNNNNNN.pt files with model, optimizer, RNG, state, options and loss as full tensors, so that any number
    of processes resumes one (with several, all gather and rank 0 writes). The newest two are kept; .last is named
    when the run stops."""

    def __init__(self, folder, model, optimizer, cfg, loss_type):
        self.folder, self.model, self.optimizer, self.cfg, self.loss_type = folder, model, optimizer, cfg, loss_type
        self.last = None

    def save(self, state, keep=2):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        state["window"] = metrics_to_host(state["window"])  # floats (with several processes, their sums)
        blob = {"model": get_model_state_dict(self.model, options=full_state_options()),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=full_state_options()),
                "state": state, "config": dataclasses.asdict(self.cfg), "loss_type": self.loss_type,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        self.last = os.path.join(self.folder, f"step_{state['step']:07d}.pt")
        if rank() == 0:
            save_whole(blob, self.last)
            for old in sorted(glob.glob(os.path.join(self.folder, "step_*.pt")))[:-keep]:
                os.remove(old)
        else:  # the sums now count once, on rank 0 (as after a resume)
            state["window"] = {}
        return self.last

    def resume(self, metrics_path, total_steps, log):
        """Weights, optimizer, RNG and state from the newest checkpoint (its options were checked before any work),
        and metrics.jsonl cut back to it; a new state if there is none."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
            set_optimizer_state_dict
        ckpt, self.last = latest_checkpoint(self.folder)
        if ckpt is None:
            log(f"[{self.loss_type}] --resume: no checkpoint in {self.folder}, starting from the beginning")
            return new_state()
        full = StateDictOptions(full_state_dict=True)  # each process takes its shard from the full tensors
        set_model_state_dict(self.model, ckpt["model"], options=full)
        set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"], options=full)
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        state = ckpt["state"]
        if rank() != 0:  # the saved window holds the sums of all processes: rank 0 carries them, once
            state["window"] = {}
        else:
            cut_metrics_file(metrics_path, state["step"], log)
        log(f"[{self.loss_type}] resumed from {self.last} at step {state['step']} of {total_steps}")
        return state

def cut_metrics_file(path, step, log):
    """metrics.jsonl's rows up to the checkpoint's step; a line a crash cut short, or no file, is reported."""
    lines = open(path).readlines() if os.path.exists(path) else []
    if not lines:
        log(f"WARNING: {path} is missing or empty: its rows up to step {step} are lost; new rows go to a new one")
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            log(f"WARNING: {path}: dropped a line that was cut short ({line.strip()[:40]!r}...)")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= step)

# --- Output: the trained model, summary.json, the table that compares the losses, the progress bar

def save_model(model, tokenizer, out_dir):
    """save_pretrained of the model and tokenizer; with several processes rank 0 gathers and writes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    weights = get_model_state_dict(model, options=full_state_options()) if world() > 1 else None
    if rank() == 0:
        model.save_pretrained(out_dir, state_dict=weights)
        tokenizer.save_pretrained(out_dir)

def write_summary(cfg, state, loss_type, n_pairs, out_dir):
    """summary.json, written last (its presence means "done"): first and last evaluation, options, and
    throughput: the training steps' tokens (no pads) over their time alone."""
    first, last, seconds = state["first_eval"], state["last_eval"], state["train_seconds"]
    summary = {"loss_type": loss_type, "steps": state["step"], "train_pairs": n_pairs[0], "eval_pairs": n_pairs[1],
               "lr": peak_lr(cfg), "eval_loss_start": first["loss"],
               "eval_reward_accuracy_start": first["reward_accuracy"],
               "eval_generation_accuracy_start": first.get("generation_accuracy"),
               **{f"eval_{k}": v for k, v in last.items()},
               "train_tokens_per_second": state["tokens_seen"] / seconds if seconds else None,
               "train_seconds": seconds, "runtime_seconds": state["elapsed"], "config": dataclasses.asdict(cfg)}
    if rank() == 0:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary

TABLE = {"eval_reward_accuracy_start": "reward acc @0", "eval_reward_accuracy": "reward acc",
         "eval_rewards/margin": "margin", "eval_ranking_accuracy": "rank acc",
         "eval_ranking_accuracy_ref_correct": "rank acc (ref right)",
         "eval_ranking_accuracy_ref_incorrect": "rank acc (ref wrong)", "eval_logps/chosen": "logp chosen",
         "eval_logps/rejected": "logp rejected", "eval_generation_accuracy_start": "gen acc @0",
         "eval_generation_accuracy": "gen acc"}

def comparison_table(summaries):
    cols = {k: max(8, len(c) + 2) for k, c in TABLE.items() if any(s.get(k) is not None for s in summaries.values())}
    lines = ["", f"held-out results ({next(iter(summaries.values()))['eval_pairs']} pairs)",
             f"{'loss':<19}" + "".join(f"{TABLE[k]:>{w}}" for k, w in cols.items())]
    for lt, s in summaries.items():
        name = lt + (" (detached)" if lt == "focalpo" and s["config"]["focal_detach"] else "")
        lines.append(f"{name:<19}" + "".join(f"{'-' if s.get(k) is None else format(s[k], '.3f'):>{w}}"
                                              for k, w in cols.items()))
    return "\n".join(lines)

# --- Fault handling: signals, non-finite steps, out of memory, a lost process

class StopSignals:
    """Ctrl-C / SIGTERM in training: the step in flight finishes, a checkpoint is saved, the run stops. A second
    signal stops at once (KeyboardInterrupt)."""

    def __enter__(self):
        self.signal, self.old = None, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self.old[sig] = signal.signal(sig, self.on_signal)
        return self

    def on_signal(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def stop_here_if_asked(self, step, total_steps, device, saver, state):
        """After a signal to this process (or, with several, to any): all save and stop at this step."""
        if agree(self.signal is not None, device, "max") and step < total_steps:  # every process stops here
            by = signal.Signals(self.signal).name if self.signal else "a signal to another process"
            raise Interrupted(f"stopped by {by} at step {step} of {total_steps}; checkpoint saved to "
                              f"{saver.save(state)}. To continue, run the same command with --resume=true")

def nonfinite_pairs(micro_batches, losses):
    """The step's pairs whose loss is not finite, from every process (rare, so the waits do not matter)."""
    bad = [i for b, l in zip(micro_batches, losses) for i in b["idx"][~torch.isfinite(l).cpu()].tolist()]
    if world() > 1:
        gathered = [None] * world()
        dist.all_gather_object(gathered, bad)
        bad = sorted(i for share in gathered for i in share)
    return bad

MAX_BAD_STEPS = 3  # consecutive steps with a non-finite loss or gradient that stop the run

def skip_nonfinite_step(state, where, saver, say):
    """A NaN/inf step made no update: name its rows; MAX_BAD_STEPS in a row stop the run."""
    state["bad_steps"] += 1
    rows = ", ".join(where) or "none: the gradient only"
    say(f"step {state['step']}: WARNING: non-finite loss or gradient, update skipped (training rows: {rows})")
    if state["bad_steps"] >= MAX_BAD_STEPS:
        last = f"The last good checkpoint is {saver.last} (--resume=true)." if saver.last else "No checkpoint yet."
        raise FocalpoError(f"{state['bad_steps']} consecutive steps had a non-finite loss or gradient (the last at "
                           f"step {state['step']}, training rows: {rows}): check those rows or lower --lr. {last}")

@contextlib.contextmanager
def stop_on_out_of_memory(cfg, micro, state, saver):
    """Out of GPU memory in a step: save the last whole step and stop, naming what uses less memory."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        saver.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        saved = f"; checkpoint saved to {saver.save(state)}, continue with --resume=true" if state["step"] else ""
        raise FocalpoError(
            f"out of GPU memory at step {state['step'] + 1} with --batch_size={cfg.batch_size} pairs of up to "
            f"{max(b['input_ids'].shape[1] for b in micro)} tokens: lower --batch_size (raising --grad_accum to keep "
            f"the batch), set --gradient_checkpointing=true, or lower --max_length{saved}") from None

def exit_code(e):
    """One line and an exit code for an error the user can fix, or a stop; the rest is raised."""
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
    lost = isinstance(e, dist.DistError) or any(s in str(e) for s in ("Connection closed by peer", "timed out",
                                                                      "Connection reset by peer", "Timed out", "NCCL"))
    if world() > 1 and isinstance(e, RuntimeError) and lost:
        detail = str(e).splitlines()[0].split("] ", 1)[-1][:120]  # without gloo's source-file prefix
        print(f"{who}error: lost contact with another process ({detail}): it stopped or hung, see its own "
              f"output; the newest checkpoint continues with --resume=true", file=sys.stderr)
        return 1
    raise e

# --- Several processes (torchrun --nproc_per_node=N focalpo.py ...), FSDP2. With one, each helper is a no-op

def rank():
    return dist.get_rank() if dist.is_initialized() else 0

def world():
    return dist.get_world_size() if dist.is_initialized() else 1

@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block (and caches what it makes) before the others (which load the cache)."""
    if rank() != 0:
        dist.barrier()
    yield
    if rank() == 0 and world() > 1:
        dist.barrier()

def my_share(items):
    """Process r of N takes items r, r+N, ... Under FSDP every forward is collective, so all need as many: a short
    share is padded with repeats, as in DistributedSampler."""
    return [items[i % len(items)] for i in range(rank(), math.ceil(len(items) / world()) * world(), world())]

def all_reduce(t, op="sum"):
    """t summed (or max'ed, min'ed) over the processes, in place."""
    if world() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t

def agree(flag, device, op):
    """A bool all processes share: any ("max") or all ("min") of theirs."""
    if world() == 1:
        return bool(flag.item() if torch.is_tensor(flag) else flag)
    return bool(all_reduce(torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1), op).item())

def reshard(model):
    """FSDP keeps the root's weights gathered after a forward with no backward: put the shards back."""
    if hasattr(model, "reshard"):
        model.reshard()

def model_logps(model, batch):
    """sequence_logps, through FSDP's hooks when the model is sharded."""
    return model.sequence_logps(batch) if hasattr(model, "sequence_logps") else sequence_logps(model, batch)

def setup_processes(cfg):
    """The device; under torchrun also the process group (NCCL on CUDA, gloo on the CPU), with a timeout: a
    process that hangs stops the others."""
    device, n = pick_device(), int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return device
    from torch.distributed import fsdp
    if not hasattr(getattr(fsdp, "FSDPModule", None), "set_force_sum_reduction_for_comms"):
        raise FocalpoError(f"several processes need torch 2.8 or newer (its FSDP2), and this is torch "
                           f"{torch.__version__}: upgrade torch, or run one process")
    if cfg.grad_accum % n:
        raise FocalpoError(f"--grad_accum={cfg.grad_accum} is not a multiple of the {n} processes, which share each "
                           f"step's micro-batches equally: use --grad_accum={n * math.ceil(cfg.grad_accum / n)}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return device

def shard_model(model, device):
    """FSDP2 over each decoder layer, then the model; fp32 weights compute in bf16 on CUDA, as with autocast.
    Gradients are SUMMED (each loss is already divided by the step's pairs). FSDP gathers the root's weights around
    the fast sequence_logps and generate, which call the model's parts."""
    if world() == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    bf16_compute = device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    mp = MixedPrecisionPolicy(**dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute else {})
    for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum, do not average
            m.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no pre-scaled reduction
    if model.fast_logps:  # the model's own forward goes through FSDP's hooks already
        model.sequence_logps = types.MethodType(sequence_logps, model)
        register_fsdp_forward_method(model, "sequence_logps")
    register_fsdp_forward_method(model, "generate")
    return model.to(device)

def full_state_options():
    """Full tensors, gathered to rank 0's host memory one at a time: any number of processes resumes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=world() > 1, cpu_offload=world() > 1)

if __name__ == "__main__":
    main()
