"""
focalpo: preference optimisation beyond DPO, in one readable file.

Trains a Hugging Face causal LM on preference pairs (prompt, chosen, rejected) with three losses, each from the
same start (--loss picks):
    DPO       Rafailov et al. 2023, arXiv 2305.18290
    FocalPO   Liu et al. 2025,      arXiv 2501.06645
    MinorDPO  Xie et al. 2024,      arXiv 2408.09834

    python focalpo.py        # the demo: offline, a tiny model, 1-2 minutes on 2 CPU cores
    python focalpo.py --model=Qwen/Qwen2.5-0.5B-Instruct --dataset=trl-lib/ultrafeedback_binarized --loss=focalpo
    python focalpo.py --model=path/to/model.gguf --dataset=pairs.jsonl
    torchrun --nproc_per_node=8 focalpo.py --model=... --dataset=... --grad_accum=8  # several GPUs (FSDP2)

Reading guide. The core reads top to bottom, in data-flow order; a first reading stops at "# Appendix". The core
calls into it through these names:
    checks.    before any work: options, folders, earlier runs, data files, the model's config and memory
    hub.       a config, tokenizer or model: a hub name, a folder or a .gguf file
    files.     the rows (demo, files or hub) and held-out rows, in one format: plain, chat or implicit (no prompt)
    demo.      a letter-sorting task: its data, tokenizer and model, an SFT stage, generation accuracy
    fast.      the model's own log-probs in less memory; batches of similar length; pinned memory
    cache.     the reference log-probs, kept by what changes them
    AdamWSR    AdamW for bf16 weights, with stochastic rounding
    RunFolder  metrics.jsonl and the checkpoints --resume continues from
    Guard      a stop in one sentence: a signal, out of memory, 3 NaN/inf steps in a row
    output.    ranking accuracies, metric means; the model, summary.json, the losses' table, curves.png, generations
    procs.     the device, and torchrun: a comment "several processes: ..." says what its line does there
    cli.       the command line: --key=value, one sentence per mistake, exit codes

Notation: for a prompt x, chosen y_w and rejected y_l, r_w = log πθ(y_w|x) − log π_ref(y_w|x), r_l the same for
y_l, h = r_w − r_l, p = σ(βh). "Pitfall N": the README's list of 13 ways DPO implementations went wrong; the comment
beside the tag says which.
"""

import collections
import contextlib
import dataclasses
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

# --- Config: override any default as --key=value

@dataclasses.dataclass
class Config:
    # model and data
    model: str = "demo"  # "demo" (a tiny model built offline), a hub name, a local folder or a .gguf file
    dataset: str = "demo"  # "demo" (a sorting task made in code), a hub name, or .jsonl/.json/.csv/.parquet files
    eval_dataset: str = ""  # held-out files; "" = the dataset's test split if it has one, else a seeded 5% of it
    max_train_pairs: int = 0  # train on N of the training rows (0 = all)
    max_eval_pairs: int = 500  # evaluate on N of the held-out rows (0 = all)
    max_length: int = 1024  # prompt + response tokens, per sequence
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    sft_steps: int = 80  # demo only: first, next-token training on correct sortings (SFT)
    # loss
    loss: str = "dpo,focalpo,minordpo"  # one loss or a comma-separated list, each trained from the same start
    beta: float = 0.1  # β, DPO's KL penalty weight: larger = stay closer to the reference
    gamma: float = 0.05  # FocalPO's γ (0 = DPO). 0.05 is THIS PROJECT's default, not a value from the paper
    focal_detach: bool = False  # FocalPO variant: p^γ a constant weight (no gradient through it)
    # optimisation
    lr: float = 0.0  # peak learning rate; 0 = 3e-4 for --model=demo, else 5e-7 (7B DPO recipes' rate)
    batch_size: int = 8  # pairs per micro-batch (two sequences each)
    grad_accum: int = 2  # micro-batches per optimizer step (several processes share them: a multiple of their count)
    epochs: int = 1  # passes over the training pairs
    max_steps: int = 0  # train N optimizer steps (0 = as many as --epochs make)
    warmup_ratio: float = 0.1  # the share of steps warming up linearly, then a cosine towards 0
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    weights: str = "fp32"  # "fp32" (bf16 autocast on a GPU), or "bf16": half the memory, stochastic rounding
    # run
    seed: int = 1337  # seeds the demo's model, the data split, the shuffling and bf16 rounding
    eval_every: int = 25  # evaluate every N steps (and at the start and the end)
    log_every: int = 5  # a line in metrics.jsonl every N steps
    out_dir: str = "out"  # one run's metrics, summary and model (out_dir/<loss>/ for several losses)
    cache_dir: str = "ref_cache"  # cached reference log-probs (and the demo's SFT weights)
    save_model: bool = True  # save_pretrained the trained model and tokenizer at the end
    save_every: int = 100  # checkpoint every N steps and at the end (0: only at the end)
    keep_final_checkpoint: bool = False  # keep a finished run's last checkpoint
    resume: bool = False  # continue the run in out_dir from its newest checkpoint
    dist_timeout: int = 900  # several processes: seconds a collective may wait
    progress: bool = True  # show a tqdm progress bar
    generate: int = -1  # at the end, show N held-out prompts' greedy completions (-1: 5 for --dataset=demo, else 0)

LOSSES = ("dpo", "focalpo", "minordpo")

class FocalpoError(Exception):
    """A problem the user can fix: one sentence, no traceback."""

def loss_types(cfg):
    return [l.strip() for l in cfg.loss.split(",") if l.strip()]

def peak_lr(cfg):
    return cfg.lr or (3e-4 if cfg.model == "demo" else 5e-7)

def weights_dtype(cfg):
    return torch.bfloat16 if cfg.weights == "bf16" else torch.float32

def steps_per_epoch(cfg, n_train):
    return math.ceil(n_train / cfg.batch_size) // cfg.grad_accum

def run_steps(cfg, n_train):
    return cfg.max_steps or cfg.epochs * steps_per_epoch(cfg, n_train)

# --- Losses: pure functions of per-pair summed log-probs, each (B,)

def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    loss_type="dpo", beta=0.1, gamma=0.05, focal_detach=False):
    """Per-pair losses (B,), and the rewards β·r_w (B,) and β·r_l (B,) for logging (detached).

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
        # torch.where, not clamp (whose gradient at 0 is 1): where r_l is exactly 0 (policy = reference), y_l gets none
        r_l_pos = torch.where(r_l > 0, r_l, torch.zeros_like(r_l))
        losses = -F.logsigmoid(beta * (r_w - r_l_pos))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSSES}")
    return losses, beta * r_w.detach(), beta * r_l.detach()

# --- Data: each row (files.load) as three texts (files.render), tokenized

@dataclasses.dataclass
class Pair:
    idx: int  # position in its split: indexes the reference log-probs
    chosen: torch.Tensor  # (Tc,) int32 token ids, prompt then response
    chosen_start: int  # first response token of chosen
    rejected: torch.Tensor  # (Tr,)
    rejected_start: int
    where: str = ""  # the file (or split) and row it came from

def uses_bos(tokenizer):  # does it put BOS first? (Llama yes; Qwen, GPT-2 no)
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]

def common_prefix_len(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

def split_response(prompt_alone, full, end, bos, cfg, notes):
    """Splits `full` (a prompt and its response, tokenized together) where it leaves `prompt_alone`, puts `end`
    after the response and cuts both to fit. Returns (token ids, where the response starts); adds to `notes`."""
    n = common_prefix_len(prompt_alone, full)
    if n < len(prompt_alone):  # a token merged across the boundary (pitfall 1): "Q: " -> "Q", ":", " "
        notes.add("boundary token merged")  # but "Q: yes" -> "Q", ":", " yes": the response starts where they differ
    prompt, response = full[:n], full[n:] + end
    if len(prompt) > cfg.max_prompt_length:  # its BOS, then its last tokens: max_prompt_length in all
        first = [bos] if bos is not None else []
        prompt = first + prompt[len(prompt) - (cfg.max_prompt_length - len(first)):]
        notes.add("prompt truncated")
    if len(prompt) + len(response) > cfg.max_length:  # a response token stays (checks: max_prompt_length < max_length)
        response = response[:cfg.max_length - len(prompt)]
        notes.add("response truncated")
    return torch.tensor(prompt + response, dtype=torch.int32), len(prompt)

def tokenize_pairs(rows, fmt, tokenizer, cfg, stats):
    """(row, where) tuples -> Pairs; `stats` (a Counter) counts the rows cut, merged or dropped, by reason."""
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None  # the BOS every sequence starts with, or none
    # EOS ends each response: the model learns to stop; chat templates close the turn themselves (pitfall 3)
    end = [] if fmt == "chat" else [tokenizer.eos_token_id]
    pairs = []
    for row, where in rows:
        rendered = files.render(row, fmt, tokenizer)  # (prompt, prompt + chosen, prompt + rejected), or why not
        if isinstance(rendered, str):  # the row is dropped
            stats[rendered] += 1
            continue
        # tokenized without special tokens, BOS added below: one BOS, not two or none (pitfall 2)
        prompt, full_chosen, full_rejected = tokenizer(list(rendered), add_special_tokens=False)["input_ids"]
        if bos is not None and prompt[:1] != [bos]:
            prompt, full_chosen, full_rejected = [bos] + prompt, [bos] + full_chosen, [bos] + full_rejected
        notes = set()  # what happened to this row, each counted once in stats
        c, c_start = split_response(prompt, full_chosen, end, bos, cfg, notes)
        r, r_start = split_response(prompt, full_rejected, end, bos, cfg, notes)
        if 0 in (c_start, r_start):  # then no token predicts the response's first token
            notes.add("no token before the response")
        elif len(c) == c_start or len(r) == r_start:
            notes.add("empty response after tokenization")  # pitfall 11: nothing left to score
        elif torch.equal(c, r):
            notes.add("chosen == rejected after truncation")
        else:
            pairs.append(Pair(len(pairs), c, c_start, r, r_start, where))
        stats.update(notes)
    return pairs

def prepare_data(cfg, tokenizer, log=print):
    """(train pairs, eval pairs); the log says where held-out pairs come from, and what was cut or dropped."""
    train_rows, eval_rows, fmt, source = files.load(cfg)  # source: held-out rows' origin
    checks.tokenizer(tokenizer, fmt)  # chat rows need a chat template; others, an EOS
    split = {}  # name -> pairs
    for name, rows, most in (("train", train_rows, cfg.max_train_pairs), ("eval", eval_rows, cfg.max_eval_pairs)):
        rows = rows[:most or None]
        stats = collections.Counter()
        pairs = tokenize_pairs(rows, fmt, tokenizer, cfg, stats)
        if name == "eval":  # held-out pairs also in training: counted, kept; if all are, the run stops
            checks.not_trained_on(pairs, split["train"], source, stats)
        counts = ", ".join(f"{n} {why}" for why, n in sorted(stats.items()) if n)
        log(f"data: {name}: {len(pairs)} pairs from {len(rows)} rows ({fmt} format)"
            + (f" of {source}" if name == "eval" else "") + (f"; rows with {counts}" if counts else ""))
        if not pairs:
            raise FocalpoError(f"no usable {name} pairs are left after filtering ({counts or 'no rows'}): "
                               f"check the data, or raise --max_length / --max_prompt_length")
        split[name] = pairs
    if steps_per_epoch(cfg, len(split["train"])) == 0:
        raise FocalpoError(f"{len(split['train'])} training pairs do not fill one step of --grad_accum="
                           f"{cfg.grad_accum} micro-batches of --batch_size={cfg.batch_size}: lower them")
    return split["train"], split["eval"]

# --- Batches: two right-padded rows per pair, and the positions scored

def step_stream(train_pairs, cfg, skip):
    """Endless seeded steps of --grad_accum batches each, less the first `skip` (a resumed run's); each epoch
    reshuffles, and its batches beyond its last full step are left out."""
    epoch, n = 0, 0
    while True:
        # ⌈pairs / batch_size⌉ lists of Pairs (one may be short), similar lengths, seeded order
        batches = fast.length_grouped_batches(train_pairs, cfg.batch_size, cfg.seed + epoch)
        for i in range(0, steps_per_epoch(cfg, len(train_pairs)) * cfg.grad_accum, cfg.grad_accum):
            if n >= skip:
                yield batches[i:i + cfg.grad_accum]
            n += 1
        epoch += 1

def collate_sequences(seqs, starts, pad_id):
    """Rows right-padded (pitfall 6: left padding shifts positions), and `scored`: for each response token t, the
    (row, t - 1) whose logits predict it (pitfall 5), so a pad that equals EOS is never scored while the real EOS is
    (pitfall 4). Listed on the host: no GPU wait in the forward."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (R, T)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (R, T)
    rows, cols = [], []
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(s)] = s
        attention_mask[i, :len(s)] = 1
        response = range(start, len(s))  # the response tokens' positions
        rows += [i] * len(response)
        cols += [t - 1 for t in response]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "scored": torch.tensor([rows, cols]),  # (2, N)
            "n_tokens": torch.tensor([len(s) - start for s, start in zip(seqs, starts)])}  # (R,) response tokens

def collate(pairs, pad_id):
    """B pairs -> 2B rows (the chosen, then the rejected), and each pair's index and where it came from."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs],
                              [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs], pad_id)
    return dict(batch, idx=torch.tensor([p.idx for p in pairs]), where=[p.where for p in pairs])

def scoring_batches(pairs, batch_size, pad_id):
    """Collated batches sorted by length, for a no-grad pass (reference, evaluation)."""
    return [collate(b, pad_id) for b in fast.length_grouped_batches(pairs, batch_size, seed=0, shuffle=False)]

# --- Model and tokenizer

def autocast(device):  # bf16 compute on CUDA
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

def load_tokenizer(cfg):
    tok = demo.tokenizer() if cfg.model == "demo" else hub.load("AutoTokenizer", cfg.model)
    if tok.pad_token_id is None:  # no pad is ever scored: any id will do
        if tok.eos_token_id is None:
            raise FocalpoError(f"the tokenizer of {cfg.model!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok

def load_model(cfg, tokenizer):
    if cfg.model == "demo":
        return demo.model(tokenizer, cfg.seed)
    return hub.load("AutoModelForCausalLM", cfg.model, dtype=weights_dtype(cfg))

def prepare_model(model, cfg, device):
    """Dropout off (pitfall 8: else policy != reference at step 0), gradient checkpointing if asked, the device and
    dtype. Last, fast.probe: if on two random rows the fast path gives the model's own log-probs, it sets the model's
    attention, from then on, to causal SDPA with no mask (exact where no scored token sees a pad: right-padded rows,
    generation batched by length) and model.fast_logps; else it changes nothing."""
    for m in [model.config, *model.modules()]:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # float rates the forward passes to F.dropout (OPT's modules, Falcon's config)
        for name in [k for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]:
            setattr(m, name, 0.0)
    if cfg.gradient_checkpointing:  # transformers 5.23 renamed gradient_checkpointing_enable (the old name warns)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model = model.to(device, weights_dtype(cfg))
    fast.probe(model, cfg.max_length, device)
    return model

# --- Log-probs: the response tokens only (pitfall 5), an fp32 log-softmax, float64 sums (pitfall 7)

def sequence_logps(model, batch):
    """Each row's response-token log-probs summed (as in the DPO paper, not averaged) in float64, (R,), and their
    number, (R,). The DPO reference code's form (here in float64) gives the same numbers, to rounding:

        logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # position t predicts t + 1
        logps = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None])[..., 0]          # (R, T - 1)
        mask = torch.zeros_like(logps); mask[rows, cols] = 1                              # rows, cols = batch["scored"]
        return (logps.double() * mask).sum(1), batch["n_tokens"]

    Here the log-softmax is taken at the scored positions only."""
    ids, (rows, cols) = batch["input_ids"], batch["scored"]  # (R, T); (N,), (N,)
    targets = ids[rows, cols + 1]  # (N,) the token each scored position predicts
    if getattr(model, "fast_logps", False):  # set by prepare_model (above): no (R, T, V) logits
        token_logps = fast.token_logps(model, ids, rows, cols, targets)  # (N,)
    else:  # the model's own forward
        logits = model(ids, attention_mask=batch["attention_mask"], use_cache=False).logits[rows, cols]  # (N, V)
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    sums = torch.zeros(len(ids), dtype=torch.float64, device=ids.device).index_add(0, rows, token_logps.double())
    return sums, batch["n_tokens"]  # (R,), (R,)

# --- Reference log-probs: a no-grad pass of the initial weights (cached: cache.reference)

@torch.no_grad()
def pair_logps(model, batches, n_pairs, device):
    """(n_pairs, 2) float64 on the host, by pair index: log π(y_w|x) and log π(y_l|x) of the pairs in `batches`,
    −inf for the others."""
    was_training = model.training
    model.eval()  # HF's gradient checkpointing off
    logps = torch.full((n_pairs, 2), -math.inf, dtype=torch.float64, device=device)
    for batch in procs.my_share(batches):  # several processes: each scores its share (one: all)
        with autocast(device):
            lp, _ = sequence_logps(model, fast.to_device(batch, device))
        logps[batch["idx"].to(device)] = lp.view(2, -1).T  # (B, 2): chosen, rejected
    model.train(was_training)
    return procs.gather_scores(model, logps).cpu()  # several processes: a max takes each pair from its scorer

# --- Metrics (pitfall 13: misread metrics): sums over pairs, divided at the end: exact however a step is split

def loss_and_metrics(logps, n_tokens, ref, cfg, loss_type):
    """Per-pair losses (B,) and the batch's metrics as SUMS over pairs, on logps' device ("pairs" aside; reading one
    is a wait). logps, n_tokens: (2B,), chosen first; ref: (B, 2)."""
    B = ref.shape[0]
    chosen, rejected = logps[:B], logps[B:]  # log πθ(y_w|x), log πθ(y_l|x)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen, rejected, ref[:, 0], ref[:, 1], loss_type=loss_type, beta=cfg.beta, gamma=cfg.gamma,
        focal_detach=cfg.focal_detach)
    chosen, rejected = chosen.detach(), rejected.detach()
    # reward accuracy: a tie counts half (chance), so a policy bit-equal to the reference reads 0.5
    win = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return losses, {
        "pairs": float(B), "loss": losses.detach().float().sum(),
        "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
        "rewards/margin": (chosen_rewards - rejected_rewards).sum(), "reward_accuracy": win.sum(),
        "logps/chosen": chosen.sum(), "logps/rejected": rejected.sum(),
        # ranking_accuracy: log πθ(y_w|x) >= log πθ(y_l|x), a tie right (Chen et al.'s rule); _norm: per token;
        # _ref_correct, _ref_incorrect: of the pairs the reference ranks right, wrong (divided by counts: pairs_ref_*)
        **output.ranking_sums(chosen, rejected, n_tokens, ref),
        "response_tokens": n_tokens.float().sum(),
    }

def add_metrics(total, m):
    for k, v in m.items():
        total[k] = total.get(k, 0.0) + v

# --- One optimizer step, and the held-out evaluation

def lr_at(step, total_steps, cfg, peak):
    """Linear warm-up (step s at (s+1)/warmup of the peak), then a cosine decay towards 0."""
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)))

def make_optimizer(model, cfg, lr, device):
    """AdamW; for bf16 weights AdamWSR (plain AdamW loses DPO-sized updates to bf16 rounding: pitfall 12)."""
    if cfg.weights == "bf16":
        return AdamWSR(model.parameters(), lr=lr, betas=(0.9, 0.95))
    # nanoGPT's betas; no weight decay, as AdamWSR
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0, fused=device.type == "cuda")

def forward_pairs(model, batch, ref, cfg, loss_type, device):
    """One micro-batch through the policy: per-pair losses (B,) and the batch's summed metrics."""
    batch = fast.to_device(dict(batch, ref=ref[batch["idx"]]), device)  # ref: (B, 2), indexed on the host
    with autocast(device):
        logps, n_tokens = sequence_logps(model, batch)  # (2B,), (2B,): chosen first, then rejected
    return loss_and_metrics(logps, n_tokens, batch["ref"], cfg, loss_type)

def train_step(model, optimizer, micro_batches, ref, cfg, loss_type, device, n_pairs=None):
    """One optimizer step over its micro-batches, one wait for the device. Returns the summed metrics (on the device)
    and whether the update was made (NaN/inf would poison every weight). n_pairs: the step's, on all processes
    (default: these micro-batches')."""
    n_pairs = n_pairs or sum(len(b["idx"]) for b in micro_batches)
    total = {}
    for i, batch in enumerate(micro_batches):
        procs.sync_gradients(model, i == len(micro_batches) - 1)  # several processes: reduce after the last only
        losses, metrics = forward_pairs(model, batch, ref, cfg, loss_type, device)
        # gradients ADD across micro-batches (several processes: procs.shard makes FSDP2 sum): dividing each
        # one's summed loss by the step's pair count makes their sum the gradient of the step's mean loss (pitfall 10)
        (losses.sum() / n_pairs).backward()
        add_metrics(total, metrics)
    # the norm before clipping; with max_norm = inf it only measures
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    norm = procs.full(norm)  # several processes: the norm of the whole gradient
    total["grad_norm"] = norm * total["pairs"]  # a sum like the rest (output.metric_means divides by "pairs")
    # the step's one wait for the device: true if finite (several processes: on all, "min"; all update or none)
    applied = procs.agree(torch.isfinite(total["loss"]) & torch.isfinite(norm), "min")
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, applied

class HeldOut:
    """The held-out pairs, batched, and their reference; calling it evaluates a model."""

    def __init__(self, pairs, ref, tokenizer, cfg):
        self.pairs, self.ref, self.tokenizer = pairs, ref, tokenizer
        self.batches = scoring_batches(pairs, cfg.batch_size, tokenizer.pad_token_id)
        self.n_tokens = torch.tensor([len(p.chosen) - p.chosen_start for p in pairs] +
                                     [len(p.rejected) - p.rejected_start for p in pairs])

    def __call__(self, model, cfg, loss_type, device):
        logps = pair_logps(model, self.batches, len(self.pairs), device)  # (N, 2)
        _, m = loss_and_metrics(logps.T.reshape(-1), self.n_tokens, self.ref, cfg, loss_type)  # (2N,): chosen first
        out = output.metric_means({k: float(v) for k, v in m.items()})
        if cfg.dataset == "demo":
            out["generation_accuracy"] = demo.generation_accuracy(model, self.pairs, self.tokenizer, device)
        return out

# --- Training: the loop, and run()

def next_step(steps, pad_id):
    """This process's share of the next step's micro-batches, collated, and the step's pair and token counts."""
    batches = next(steps)
    pairs = [pair for batch in batches for pair in batch]
    tokens = sum(len(pair.chosen) + len(pair.rejected) for pair in pairs)
    return [collate(b, pad_id) for b in procs.my_share(batches)], len(pairs), tokens  # several processes: a share

def new_state():  # what resuming needs besides the weights, optimizer and RNG
    return {"step": 0, "tokens_seen": 0, "train_seconds": 0.0,  # tokens/s = tokens_seen (both rows, no pads) / this
            "loop_seconds": 0.0,  # evaluations included
            "window": {},  # the metric sums since the last metrics.jsonl row
            "first_eval": None, "last_eval": None}

def train_row(state, step, lr):
    """The metrics.jsonl row of the steps since the last row (their one wait), and the throughput so far."""
    row = output.metric_means(procs.sums_to_host(state["window"]))  # several processes: summed over them
    state["window"] = {}
    return dict(row, step=step, split="train", lr=lr, tokens_per_second=state["tokens_seen"] / state["train_seconds"])

def train(cfg, model, tokenizer, train_pairs, held_out, train_ref, loss_type, device, out_dir, log=print):
    """Train one loss from the model's weights (--resume: out_dir's newest checkpoint), nanoGPT's loop. Writes
    metrics.jsonl and checkpoints; returns the state."""
    n_steps = run_steps(cfg, len(train_pairs))
    optimizer = make_optimizer(model, cfg, peak_lr(cfg), device)
    folder = RunFolder(out_dir, model, optimizer, cfg, loss_type, n_steps)
    state = folder.resume(log) if cfg.resume else new_state()
    bar = tqdm(total=n_steps, initial=state["step"], desc=loss_type, dynamic_ncols=True, leave=False,
               disable=not cfg.progress or procs.rank() != 0)  # several processes: the first's only
    say = log if bar.disable else bar.write  # log lines above the bar, not through it

    def evaluate(step):  # held-out metrics at `step`: a metrics.jsonl row and a log line
        bar.set_description(f"{loss_type} (evaluating)")
        ev = held_out(model, cfg, loss_type, device)
        bar.set_description(loss_type)
        folder.append({"step": step, "split": "eval", **ev})
        say(f"[{loss_type}] step {step}: eval loss {ev['loss']:.4f}, reward accuracy {ev['reward_accuracy']:.3f}"
            + (f", margin {ev['rewards/margin']:.3f}" if step else "")
            + (f", generation accuracy {ev['generation_accuracy']:.3f}" if "generation_accuracy" in ev else ""))
        return ev

    model.train()
    t_start, loop_before = time.time(), state["loop_seconds"]
    if state["step"] == 0:  # a new run: where it starts
        state["first_eval"] = state["last_eval"] = evaluate(0)
    steps = step_stream(train_pairs, cfg, skip=state["step"])
    with Guard(folder, state, train_ref, device, say) as guard, bar:  # train_ref: to find a NaN/inf step's rows
        while state["step"] < n_steps:
            lr = lr_at(state["step"], n_steps, cfg, peak_lr(cfg))
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro, n_pairs, step_tokens = next_step(steps, tokenizer.pad_token_id)
            t0 = time.time()
            metrics, applied = train_step(model, optimizer, micro, train_ref, cfg, loss_type, device, n_pairs)
            state["train_seconds"] += time.time() - t0
            state["step"] += 1
            step = state["step"]
            state["tokens_seen"] += step_tokens
            if applied:
                add_metrics(state["window"], metrics)  # still on the device
            bar.update(1)
            if (step % cfg.log_every == 0 or step == n_steps) and state["window"]:
                row = train_row(state, step, lr)
                folder.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", train_acc=f"{row['reward_accuracy']:.2f}",
                                tok_s=f"{row['tokens_per_second']:.0f}")
            if step % cfg.eval_every == 0 or step == n_steps:
                state["last_eval"] = evaluate(step)
            state["loop_seconds"] = loop_before + time.time() - t_start
            if (cfg.save_every and step % cfg.save_every == 0) or step == n_steps:
                folder.save(state)
            guard.after_step(applied, micro)  # NaN/inf: its rows named, three in a row stop; a signal: save, stop
    return state

def loss_dir(cfg, loss_type):
    return cfg.out_dir if len(loss_types(cfg)) == 1 else os.path.join(cfg.out_dir, loss_type)

def run(cfg, log=print):
    """The whole job: data, reference, each loss from the same initial weights. Returns {loss_type: summary}."""
    t0 = time.time()
    device, log = procs.setup(cfg, log)  # several processes (torchrun): each runs all this; the first logs
    with checks.lock(cfg):  # out_dir is this run's until it ends
        finished = checks.before_work(cfg, device, log)  # a mistake stops here; --resume: {loss: summary} of those done
        tokenizer = load_tokenizer(cfg)
        train_pairs, eval_pairs = prepare_data(cfg, tokenizer, log)
        summaries = {}
        first = True
        for loss_type in loss_types(cfg):
            out_dir = loss_dir(cfg, loss_type)
            if loss_type in finished:  # --resume of a finished run (its options checked)
                log(f"[{loss_type}] already finished in {out_dir}: skipped (delete its summary.json to train it again)")
                summaries[loss_type] = finished[loss_type]
                continue
            torch.manual_seed(cfg.seed)  # each loss as if alone (bf16 weights draw random bits)
            model = prepare_model(load_model(cfg, tokenizer), cfg, device)  # each loss from the same weights
            if cfg.model == "demo" and cfg.sft_steps:  # as a real model would come SFT'd
                model = demo.sft(model, tokenizer, cfg, device, log)
            model = procs.shard(model, device)  # several processes: FSDP2
            if first:
                log(f"model: {cfg.model} ({model.num_parameters() / 1e6:.2f}M parameters) on {device.type}")
            # pair_logps of the initial weights (−inf for pairs no step uses), cached (pitfall 9: a stale cache)
            pad_id = tokenizer.pad_token_id
            train_ref, eval_ref = cache.reference(cfg, model, train_pairs, eval_pairs, pad_id, device, log)
            if first:
                right = int((eval_ref[:, 0] >= eval_ref[:, 1]).sum())
                log(f"reference: ranks {right} of {len(eval_pairs)} held-out pairs right (π_ref(y_w|x) >= "
                    f"π_ref(y_l|x)) and {len(eval_pairs) - right} wrong")
            held_out = HeldOut(eval_pairs, eval_ref, tokenizer, cfg)
            first = False
            state = train(cfg, model, tokenizer, train_pairs, held_out, train_ref, loss_type, device, out_dir, log)
            if cfg.save_model:
                output.save_model(model, tokenizer, out_dir)
            summaries[loss_type] = output.finish(cfg, state, loss_type, (len(train_pairs), len(eval_pairs)), out_dir)
            output.show_generations(model, eval_pairs, tokenizer, cfg, device, f"[{loss_type}]", log)
            del model  # one model in memory at a time
        log(output.comparison_table(summaries))
        output.plot(cfg, log)  # out_dir/curves.png
    log(f"done in {time.time() - t0:.0f}s; metrics and models in {cfg.out_dir}/")
    return summaries

def main(argv=None):  # the command line: a mistake ends in one sentence and exit code 2
    try:
        run(cli.parse_args(argv))
    except BaseException as e:
        sys.exit(cli.exit_code(e))  # re-raises anything else, as --help's SystemExit
    sys.exit(0)

# ==========================================================
# Appendix: optional machinery
# Each kind of machinery is a class; lowercase ones are namespaces.

import argparse, ast, atexit, datetime, errno, glob, hashlib, json, re, shutil, signal, tempfile
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

# --- cli

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence, not the usage
        raise FocalpoError(f"{message} (python focalpo.py --help lists every option)")

class cli:
    # TRL's / HF Trainer's names for ours
    FAMILIAR = dict(learning_rate="lr", per_device_train_batch_size="batch_size", num_train_epochs="epochs",
                    gradient_accumulation_steps="grad_accum", max_grad_norm="grad_clip", output_dir="out_dir",
                    logging_steps="log_every", eval_steps="eval_every", save_steps="save_every", loss_type="loss",
                    resume_from_checkpoint="resume", model_name_or_path="model", dataset_name="dataset")

    def parse_bool(s, yes=("1", "true", "yes", "on")):
        if s.lower() not in yes + ("0", "false", "no", "off"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
        return s.lower() in yes

    def option_help():  # {option: explanation}, from the comments in Config
        with open(__file__, encoding="utf-8") as f:
            block = f.read().split("\nclass Config:\n")[1].split("\n\n")[0]
        return dict(re.findall(r"^ +(\w+): [^\n=]+= [^\n]*?(?:  # ([^\n]*))?$", block, flags=re.M))

    def parse_args(argv=None):  # --key=value for each Config field (a bare --flag: true)
        for bars in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # they would cut the log
            os.environ.setdefault(bars, "1")
        parser = _Parser(description=__doc__.split("Reading guide")[0], allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        helps = cli.option_help()
        for f in dataclasses.fields(Config):
            kind = {"type": cli.parse_bool, "nargs": "?", "const": True} if f.type is bool else {"type": f.type}
            parser.add_argument(f"--{f.name}", default=f.default, metavar=f.type.__name__.upper(),
                                help=helps[f.name].replace("%", "%%") + f" (default: {f.default!r})", **kind)
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            import difflib
            name, _, value = unknown[0].lstrip("-").partition("=")
            near = cli.FAMILIAR.get(name) or next(iter(difflib.get_close_matches(name, helps, n=1)), None)
            hint = (f"; that is TRL's and the HF Trainer's name, here it is --{near}" if name in cli.FAMILIAR else
                    f"; did you mean --{near}?" if near else "")
            hint += "=dpo (TRL's sigmoid is DPO)" if (name, value) == ("loss_type", "sigmoid") else ""
            parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        cfg = Config(**vars(args))
        checks.options(cfg)
        return cfg

    def exit_code(e):  # a user's error or a stop: one line, an exit code
        who = f"[rank {os.environ.get('RANK')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        if isinstance(e, Interrupted):  # saved: a late signal (to every process) must not cut it short
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            e = FocalpoError("out of GPU memory scoring or generating: lower --batch_size, --max_length or --generate")
        if isinstance(e, (FocalpoError, KeyboardInterrupt)):  # KeyboardInterrupt: a second Ctrl-C, nothing to save
            kind = "interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "error"
            print(f"{who}{kind}{f': {e}' if str(e) else ''}", file=sys.stderr)
            return 130 if kind == "interrupted" else 2
        lost = isinstance(e, dist.DistError) or any(s in str(e).lower() for s in (
            "connection closed by peer", "connection reset by peer", "timed out", "nccl"))
        if procs.world() > 1 and isinstance(e, RuntimeError) and lost:
            detail = str(e).splitlines()[0].split("] ", 1)[-1][:120]  # without gloo's file prefix
            sys.stdout.flush()
            print(f"{who}error: lost contact with another process ({detail}): it stopped or hung, see its own "
                  f"output; the newest checkpoint continues with --resume=true", file=sys.stderr, flush=True)
            os._exit(1)  # at once: closing a group that lost a process can abort
        raise e

# --- checks

GiB = 2 ** 30

def first_line(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}" if str(e).strip() else type(e).__name__

class checks:
    AT_LEAST_1 = "batch_size grad_accum epochs max_length max_prompt_length eval_every log_every dist_timeout".split()
    # the options --resume may change (no result changes)
    FREE_ON_RESUME = ("log_every eval_every save_every progress resume out_dir cache_dir keep_final_checkpoint "
                      "dist_timeout generate save_model loss").split()

    def options(cfg):
        losses = loss_types(cfg)
        if "sigmoid" in losses:
            raise FocalpoError("--loss=sigmoid is TRL's name for DPO: here it is --loss=dpo")
        if not losses or not set(losses) <= set(LOSSES) or len(set(losses)) < len(losses):
            raise FocalpoError(f"--loss={cfg.loss!r}: each loss must be one of {', '.join(LOSSES)}, named once (the "
                               f"README shows how to add your own)")
        if cfg.weights not in ("fp32", "bf16"):
            raise FocalpoError(f"--weights={cfg.weights!r}: expected fp32 or bf16")
        if cfg.beta <= 0 or cfg.warmup_ratio >= 1:
            raise FocalpoError(f"--beta={cfg.beta}: must be above 0" if cfg.beta <= 0 else
                               f"--warmup_ratio={cfg.warmup_ratio}: must be below 1")
        for f in dataclasses.fields(Config):
            value, least = getattr(cfg, f.name), -1 if f.name == "generate" else int(f.name in checks.AT_LEAST_1)
            if f.type in (int, float) and not (math.isfinite(value) and value >= least):
                raise FocalpoError(f"--{f.name}={value}: must be a finite number, at least {least}")
        if cfg.max_prompt_length >= cfg.max_length:
            raise FocalpoError(f"--max_prompt_length={cfg.max_prompt_length} leaves no room for a response within "
                               f"--max_length={cfg.max_length}: make it smaller")

    @contextlib.contextmanager
    def lock(cfg):  # --out_dir for this run alone, until the file closes
        import fcntl
        checks.options(cfg)  # before any folder is made
        for name in ("out_dir", "cache_dir"):
            try:
                os.makedirs(folder := getattr(cfg, name), exist_ok=True)
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as e:
                raise FocalpoError(f"--{name}={folder} is not a folder that can be written ({e.strerror}): "
                                   f"choose another") from None
        with open(os.path.join(cfg.out_dir, ".lock"), "a") as lock:
            try:
                if procs.rank() == 0:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free = True
            except BlockingIOError:
                free = False
            if not procs.agree(free, "min"):
                raise FocalpoError(f"another run is using {cfg.out_dir} now: wait for it to end, or pass another "
                                   f"--out_dir")
            yield

    def before_work(cfg, device, log):  # earlier runs, data files, the model; {loss: summary} of finished ones
        finished = {lt: s for lt in loss_types(cfg) if (s := checks.earlier_run(cfg, lt)) is not None}
        for spec in (cfg.dataset, cfg.eval_dataset):
            if spec != "demo" and files.is_local(spec):
                files.paths(spec)
        if cfg.model != "demo":
            checks.model(cfg, device, log)
        return finished

    def earlier_run(cfg, loss_type):
        """A new run needs a folder without results, --resume the options that made it; a finished one's summary."""
        out_dir = loss_dir(cfg, loss_type)
        if not cfg.resume:
            found = [f for f in ("summary.json", "metrics.jsonl", "checkpoints") if os.path.exists(f"{out_dir}/{f}")]
            if found:
                raise FocalpoError(f"{out_dir} already holds a run's results ({', '.join(found)}): continue or show "
                                   f"that run with --resume=true, or pass a new --out_dir")
            return None
        path = os.path.join(out_dir, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                return checks.same_options(json.load(f), cfg, loss_type, path)
        ckpt, path = latest_checkpoint(os.path.join(out_dir, "checkpoints"))
        if ckpt is not None:
            checks.same_options(ckpt, cfg, loss_type, path)

    def same_options(recorded, cfg, loss_type, path):  # a checkpoint or summary, if its options match
        was = recorded.get("config") or {}
        diffs = [f"--{f.name} was {was.get(f.name)!r}, now {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
                 if f.name not in checks.FREE_ON_RESUME and was.get(f.name) != getattr(cfg, f.name)]
        if recorded["loss_type"] != loss_type:
            diffs.insert(0, f"the loss was {recorded['loss_type']!r}, now {loss_type!r}")
        if diffs:
            raise FocalpoError(f"--resume=true with options that change the result ({'; '.join(diffs)}) would not "
                               f"continue {path}: run with the original values, or start a new --out_dir")
        return recorded

    def model(cfg, device, log):  # its config loads, holds --max_length, fits
        config = hub.load("AutoConfig", cfg.model)
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if context and context < cfg.max_length:
            raise FocalpoError(f"--max_length={cfg.max_length} is longer than the {context} positions {cfg.model} "
                               f"was built for: lower --max_length (and --max_prompt_length) to at most {context}")
        checks.memory(cfg, config, device, log)

    def tokenizer(tokenizer, fmt):
        if fmt == "chat" and getattr(tokenizer, "chat_template", None) is None:
            raise FocalpoError("the data is conversational but the tokenizer has no chat template: use an "
                               "instruct/chat model's tokenizer, or plain-text data")
        if fmt != "chat" and tokenizer.eos_token_id is None:
            raise FocalpoError("the tokenizer has no EOS token, needed to end plain-text responses")

    def not_trained_on(eval_pairs, train_pairs, source, stats):
        tokens = lambda p: (p.chosen.numpy().tobytes(), p.rejected.numpy().tobytes())
        trained = {tokens(p) for p in train_pairs}
        stats["also in training"] = n = sum(tokens(p) in trained for p in eval_pairs)
        if eval_pairs and n == len(eval_pairs):
            raise FocalpoError(f"every held-out pair is also a training pair ({source}): its results would measure "
                               f"memory, not what was learned; pass --eval_dataset rows that training does not use")

    def load_error(what, name, e):  # one sentence: what, why, and what to do
        gguf = name.endswith(".gguf")
        if not os.path.exists(name) and (gguf or name.startswith((".", "/", "~")) or name.count("/") > 1):
            return FocalpoError(f"could not load {what} {name!r}: there is no such {'file' if gguf else 'folder'}; "
                                f"check the path")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = ("check that it is whole, of an architecture transformers knows, and that gguf and accelerate are "
                "installed" if gguf else
                f"check that {name} holds what save_pretrained writes" if os.path.exists(name) else
                "check the name; HF_HUB_OFFLINE is set, so only the local cache is read; or pass a local path"
                if offline else
                "check the name and your network (set HF_HUB_OFFLINE=1 to fail at once), or pass a local path")
        return FocalpoError(f"could not load {what} {name!r} ({first_line(e)}): {hint}")

    def memory_plan(config, cfg, world_size=1):
        """(bytes per GPU, a line): 18 bytes a parameter (weights, gradients, AdamW, bf16 copy; 16 under FSDP) or 8
        (bf16); ~30*H + 8*I bytes a token a layer (checkpointed: one layer); a logits chunk."""
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):  # counted without memory
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        per = 8 if cfg.weights == "bf16" else (18 if world_size == 1 else 16)
        state, buffers = n * per / world_size, 28 * min(AdamWSR.chunk, n) if cfg.weights == "bf16" else 0
        H, L, tokens = config.hidden_size, config.num_hidden_layers, 2 * cfg.batch_size * cfg.max_length
        layer, inputs = (30 * H + 8 * config.intermediate_size) * tokens, (2 if per == 8 else 4) * H * tokens * L
        acts = (inputs + layer if cfg.gradient_checkpointing else layer * L) + 2048 * config.vocab_size * 10
        return state + buffers + acts, (
            f"memory plan: {n / 1e9:.2f}B parameters x {per} bytes ({cfg.weights} training state)"
            + (f" / {world_size} processes" if world_size > 1 else "") + f" = {state / GiB:.1f} GiB"
            + (f" + optimizer buffers {buffers / GiB:.1f} GiB" if buffers else "") + f" + activations "
            f"~{acts / GiB:.1f} GiB ({cfg.batch_size} pairs x {cfg.max_length} tokens, gradient checkpointing "
            f"{'on' if cfg.gradient_checkpointing else 'off'}) = ~{(state + buffers + acts) / GiB:.1f} GiB")

    def memory(cfg, config, device, log=print):  # on a GPU: the plan beside the free memory
        if device.type != "cuda":
            return
        (needed, line), free = checks.memory_plan(config, cfg, procs.world()), torch.cuda.mem_get_info(device)[0]
        log(f"{line}; free on the GPU: {free / GiB:.1f} GiB")
        savers = [s for s, on in (("--weights=bf16", cfg.weights == "bf16"),
                                  ("--gradient_checkpointing=true", cfg.gradient_checkpointing)) if not on]
        if needed > free:
            raise FocalpoError(f"training {cfg.model} needs about {needed / GiB:.1f} GiB but the GPU has "
                               f"{free / GiB:.1f} GiB free: " + (f"add {' and '.join(savers)}, or " if savers else "")
                               + "lower --batch_size (raising --grad_accum) or --max_length, or use more GPUs "
                               "(torchrun)")

class hub:
    def load(auto_class, name, **kw):
        """transformers' auto_class from a hub name, a folder or a .gguf file (a model dequantized: transformers 5
        may keep it packed); one sentence if it fails."""
        import transformers
        path = name
        if name.endswith(".gguf"):
            kw["gguf_file"] = os.path.abspath(name)
            path = os.path.dirname(kw["gguf_file"])
            if auto_class == "AutoModelForCausalLM" and hasattr(transformers, "GgufConfig"):
                kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
        try:
            return getattr(transformers, auto_class).from_pretrained(path, **kw)
        except Exception as e:
            what = {"AutoConfig": "the config of", "AutoTokenizer": "the tokenizer of"}.get(auto_class, "model")
            raise checks.load_error(what, name, e) from None

class files:
    def render(row, fmt, tokenizer):  # -> (prompt, prompt+chosen, prompt+rejected), or why to skip the row
        if fmt == "chat":
            return files.render_chat(row, tokenizer)
        chosen, rejected = row["chosen"], row["rejected"]
        prompt = files.implicit_prompt(chosen, rejected) if fmt == "implicit" else row["prompt"]
        if fmt == "implicit":
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        if not chosen.strip() or not rejected.strip():
            return "empty response"
        return "chosen == rejected" if chosen == rejected else (prompt, prompt + chosen, prompt + rejected)

    def implicit_prompt(chosen, rejected):
        """hh-rlhf style: the common prefix, cut back to its last "Assistant:" (or its last space or newline)."""
        prefix = chosen[:common_prefix_len(chosen, rejected)]
        cut = prefix.rfind("Assistant:")
        if cut >= 0:
            return prefix[:cut + len("Assistant:")]
        cut = max(prefix.rfind(" "), prefix.rfind("\n"))
        return prefix[:cut + 1] if cut >= 0 else ""

    def turns(x, role):  # a message list (or None) as it is, a string as one turn
        return [{"role": role, "content": x}] if isinstance(x, str) else x

    def render_chat(row, tokenizer):
        """A chat row -> the three texts through the chat template, or the reason to skip it."""
        prompt, chosen, rejected = (files.turns(row.get(k), "user" if k == "prompt" else "assistant")
                                    for k in ("prompt", "chosen", "rejected"))
        if prompt is None:  # the turns chosen and rejected share (trl-lib/ultrafeedback_binarized)
            prompt = chosen[:common_prefix_len(chosen, rejected)]
        # each may repeat the prompt turns: keep what follows
        chosen, rejected = (r[len(prompt):] if r[:len(prompt)] == prompt else r for r in (chosen, rejected))
        if not prompt:
            return "no prompt turns"
        if not chosen or not rejected or not all(m["content"].strip() for m in chosen + rejected):
            return "empty response"
        if chosen == rejected:
            return "chosen == rejected"
        return (tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                tokenizer.apply_chat_template(prompt + chosen, tokenize=False),
                tokenizer.apply_chat_template(prompt + rejected, tokenize=False))

    def load(cfg):
        """(train rows, held-out rows, format, the held-out rows' source); each row (dict, where), of one format."""
        if cfg.dataset == "demo":
            rows = [(r, f"demo pair {i}") for i, r in enumerate(demo.pairs(demo.N_PAIRS, cfg.seed), 1)]
            return rows[:4000], rows[4000:], "plain", "the demo's held-out pairs"
        local = files.is_local(cfg.dataset)
        train_rows, heldout, source = (files.read(cfg.dataset), None, None) if local else files.hub(cfg.dataset)
        if cfg.eval_dataset:
            heldout, source = files.read(cfg.eval_dataset), cfg.eval_dataset
        fmt = files.detect_format(train_rows)
        if heldout and files.detect_format(heldout) != fmt:  # each would be rendered wrong
            raise FocalpoError(f"the training rows are in {fmt} format ({train_rows[0][1]}) and the held-out rows "
                               f"in {files.detect_format(heldout)} format ({heldout[0][1]}): give both in one format")
        for row, where in train_rows + (heldout or []):
            files.check_row(row, fmt, where)
        if heldout is None:  # hold out a seeded 5%
            order = list(range(len(train_rows)))
            random.Random(cfg.seed).shuffle(order)
            n_eval = max(1, round(0.05 * len(train_rows))) if len(train_rows) > 1 else 0
            heldout, train_rows = [train_rows[i] for i in order[:n_eval]], [train_rows[i] for i in order[n_eval:]]
            source = f"{cfg.dataset}, held out of training (a seeded 5%; --eval_dataset to choose)"
        return train_rows, heldout, fmt, source

    def is_messages(x):
        return isinstance(x, list) and all(isinstance(m, dict) for m in x)

    def detect_format(rows):  # the first row's: 'plain', 'chat' (message lists) or 'implicit' (no prompt)
        if not rows:
            raise FocalpoError("the dataset is empty")
        first, where = rows[0]
        if not {"chosen", "rejected"} <= set(first):
            raise FocalpoError(f"{where}: expected columns 'chosen' and 'rejected' (and optionally 'prompt'), "
                               f"found: {', '.join(sorted(first)) or 'none'}")
        if any(files.is_messages(first.get(k)) for k in ("prompt", "chosen", "rejected")):
            return "chat"
        return "plain" if first.get("prompt") is not None else "implicit"

    def check_row(row, fmt, where):
        """An error naming the row unless it has the first row's format (chat rows may mix strings and messages)."""
        for name in ("chosen", "rejected") if fmt == "implicit" else ("prompt", "chosen", "rejected"):
            x = row.get(name)
            if fmt != "chat" and not isinstance(x, str):
                raise FocalpoError(f"{where}: {name!r} should be a string, as in the first row ({fmt} format), "
                                   f"found {type(x).__name__}; a file holds one format (plain, chat or implicit)")
            if fmt == "chat" and not (isinstance(x, str) or files.is_messages(x) or (name == "prompt" and x is None)):
                raise FocalpoError(f"{where}: {name!r} should be a list of {{role, content}} messages or a string, "
                                   f"found {type(x).__name__}")
            for m in x if files.is_messages(x) else []:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise FocalpoError(f"{where} {name!r}: each message needs a 'role' and a string 'content', "
                                       f"found {m!r:.80}")

    def kind(path):  # "x.JSONL.gz": 'json' (the datasets loader), or None
        name = re.sub(r"\.(gz|bz2|xz)$", "", path.lower())
        return {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(name)[1])

    def is_local(spec):
        return any(files.kind(p) or os.path.exists(p) for p in spec.split(",") if p)

    def paths(spec):  # the comma-separated files, each checked to exist
        for path in (paths := [p for p in spec.split(",") if p]):
            if not os.path.isfile(path):
                raise FocalpoError(f"data file {path} " + ("is a folder" if os.path.isdir(path) else "does not exist"))
        return paths

    def read(spec):  # [(row, where)] from the files
        import datasets
        rows = []
        for path in files.paths(spec):
            if files.kind(path) is None:
                raise FocalpoError(f"{path}: not a data file this reads (.jsonl, .json, .csv, each maybe .gz, .bz2 "
                                   f"or .xz, or .parquet)")
            try:
                table = datasets.load_dataset(files.kind(path), data_files=path, split="train").to_list()
            except Exception as e:  # the error under datasets' error
                raise FocalpoError(f"could not read {path} ({first_line(e.__cause__ or e)}): fix the file, or give "
                                   f"it the name of what it holds") from None
            for i, row in enumerate(table, 1):
                where = f"{path} row {i}"
                rows.append(({k: files.as_messages(v, k, where) for k, v in row.items()}, where))
        return rows

    def as_messages(x, name, where):
        """x, or the messages a CSV file keeps as text (JSON, Python's or numpy's repr)."""
        if not (isinstance(x, str) and x.lstrip().startswith("[{") and "role" in x):
            return x
        numpy_repr = lambda text: ast.literal_eval(re.sub(r"}\s*\n\s*{", "}, {", text))
        for parse in (json.loads, ast.literal_eval, numpy_repr):
            with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
                if files.is_messages(messages := parse(x)) and all({"role", "content"} <= set(m) for m in messages):
                    return messages
        raise FocalpoError(f"{where}: {name!r} is text that looks like a list of messages (as a CSV file keeps one) "
                           f"but reads as neither JSON nor a Python list: save the data as .jsonl or .parquet")

    def hub(name):
        """(train rows, held-out rows or None, their source): splits train[_prefs], test[_prefs] or validation."""
        import datasets
        try:
            ds = datasets.load_dataset(name)
        except Exception as e:  # network, unknown names, gated datasets
            raise checks.load_error("dataset", name, e) from None
        train, test = (next((s for s in names if s in ds), None)
                       for names in (("train", "train_prefs"), ("test", "test_prefs", "validation")))
        if train is None:
            raise FocalpoError(f"dataset {name!r} has no 'train' or 'train_prefs' split (it has: {', '.join(ds)}): "
                               f"save the split you want with to_json() and pass the file")
        rows = lambda split: [(r, f"dataset {name!r} split {split!r} row {i}") for i, r in enumerate(ds[split], 1)]
        return rows(train), rows(test) if test else None, f"{name}'s {test!r} split"

class demo:
    LETTERS = "abcdefghijklmnopqrstuvwxyz"
    N_PAIRS = 4400
    SFT_BATCH, SFT_EXAMPLES, SFT_LR = 32, 3000, 1e-3

    def mistake(answer, letters, rng):  # two neighbours swapped, or a letter not in the prompt
        answer = list(answer)
        i = rng.randrange(len(answer) - 1)
        if rng.random() < 0.5:
            answer[i], answer[i + 1] = answer[i + 1], answer[i]
        else:
            answer[i] = rng.choice([c for c in demo.LETTERS if c not in letters and c not in answer])
            answer.sort()
        return answer

    def pairs(n, seed):
        """n pairs with distinct prompts: half right vs wrong, half one mistake vs two."""
        rng, pairs, seen = random.Random(seed), [], set()
        while len(pairs) < n:
            letters = rng.sample(demo.LETTERS, rng.randint(4, 8))
            if tuple(letters) in seen:
                continue
            seen.add(tuple(letters))
            good = sorted(letters)
            if rng.random() < 0.5:
                chosen, rejected = good, demo.mistake(good, letters, rng)
            else:
                chosen, rejected = demo.mistake(good, letters, rng), None
                while rejected is None or rejected in (chosen, good):  # two mistakes, not undone
                    rejected = demo.mistake(demo.mistake(good, letters, rng), letters, rng)
            pairs.append({"prompt": "sort: " + " ".join(letters) + " =",
                          "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)})
        return pairs

    def answer(prompt):  # "sort: q d m a =" -> "a d m q" (a chosen may be wrong)
        return " ".join(sorted(w for w in prompt.split() if len(w) == 1 and w in demo.LETTERS))

    def tokenizer():  # a word-level tokenizer, built offline
        from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
        from transformers import PreTrainedTokenizerFast
        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
        vocab = {w: i for i, w in enumerate(specials + list(demo.LETTERS) + ["sort", ":", "="])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
        tok.decoder = decoders.WordPiece()  # joins tokens with spaces
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                       unk_token="<unk>")

    def model(tokenizer, seed):  # a 4-layer Llama-shaped model (0.45M parameters)
        from transformers import AutoModelForCausalLM, LlamaConfig
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)

    def sft_rows(cfg):  # correct sortings of letter sets no pair uses
        letters = lambda row: frozenset(row["prompt"].split()[1:-1])
        taken = {letters(r) for r in demo.pairs(demo.N_PAIRS, cfg.seed)}
        rows = [r for r in demo.pairs(demo.SFT_EXAMPLES + 500, cfg.seed + 1) if letters(r) not in taken]
        return [(r["prompt"], " " + demo.answer(r["prompt"])) for r in rows[:demo.SFT_EXAMPLES]]

    def sft(model, tokenizer, cfg, device, log=print):
        """--sft_steps on correct sortings, stopped early: the reference sorts some prompts right, many wrong."""
        rows = demo.sft_rows(cfg)  # word-level: no boundary merges
        prompts = tokenizer([p for p, _ in rows])["input_ids"]
        answers = tokenizer([a for _, a in rows], add_special_tokens=False)["input_ids"]
        seqs = [torch.tensor(p + a + [tokenizer.eos_token_id], dtype=torch.int32) for p, a in zip(prompts, answers)]
        starts = [len(p) for p in prompts]
        data = hashlib.sha256(b"".join(s.numpy().tobytes() + bytes([n]) for s, n in zip(seqs, starts)))
        fields = {"stage": "sft", "init": cache.fingerprint(model), "data": data.hexdigest()[:16],
                  "steps": cfg.sft_steps, "lr": demo.SFT_LR, "batch": demo.SFT_BATCH,
                  "compute": f"{device.type}/{next(model.parameters()).dtype}", "version": 1}
        path = os.path.join(cfg.cache_dir, f"sft_{cache.key(fields)}.pt")
        with procs.rank0_first():
            if (cached := cache.read(path, "sft", log, everywhere=False)) is not None:
                model.load_state_dict(cached["tensors"])
                return model
            t0, rng = time.time(), random.Random(cfg.seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=demo.SFT_LR)
            model.train()
            for _ in range(cfg.sft_steps):
                pick = rng.sample(range(len(seqs)), demo.SFT_BATCH)
                batch = collate_sequences([seqs[i] for i in pick], [starts[i] for i in pick], tokenizer.pad_token_id)
                with autocast(device):
                    logps, n_tokens = sequence_logps(model, fast.to_device(batch, device))
                loss = -logps.sum() / n_tokens.sum()  # mean next-token loss of the answers
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            cache.write({"fields": fields, "tensors": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
            log(f"sft: {cfg.sft_steps} steps of {demo.SFT_BATCH} correct sortings (from {len(seqs)}, no letter set "
                f"shared with a preference pair) in {time.time() - t0:.1f}s, final loss {loss.item():.3f}; saved to "
                f"{path}")
            return model

    def is_right(prompt, text, ended):  # a greedy completion is the answer, then EOS
        return ended and text.strip() == demo.answer(prompt)

    def generation_accuracy(model, pairs, tokenizer, device):
        """The share of right greedy completions (a token more allowed: running on shows)."""
        longest = max(len(p.chosen) - p.chosen_start for p in pairs)
        got = output.greedy_completions(model, pairs, tokenizer, device, longest + 1)
        return sum(demo.is_right(*c) for c in got) / len(pairs)

class fast:
    CHUNK = 2048  # scored positions per piece of the output layer

    def to_device(batch, device):  # on CUDA via pinned memory: the CPU does not wait
        cuda = device.type == "cuda"
        return {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)) if torch.is_tensor(v)
                else v for k, v in batch.items()}

    def length_grouped_batches(pairs, batch_size, seed, shuffle=True):
        """Batches of similar length (less padding): shuffle, sort within pools of 64 batches, shuffle the batches
        (unshuffled, for scoring: sorted)."""
        length = lambda pair: max(len(pair.chosen), len(pair.rejected))
        if not shuffle:
            order = sorted(pairs, key=length)
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        rng, order = random.Random(seed), list(pairs)
        rng.shuffle(order)
        pool = 64 * batch_size
        order = [pair for i in range(0, len(order), pool) for pair in sorted(order[i:i + pool], key=length)]
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        return batches

    def token_logps(model, ids, rows, cols, targets):
        """sequence_logps's (N,) token log-probs without (R, T, V) logits (~10 GB for Qwen, 8 pairs of 1,024 tokens):
        no mask, the output layer at the scored positions only, in chunks."""
        hidden, head = fast.body(model, ids)[rows, cols], model.get_output_embeddings()  # (N, H); output layer
        logps = lambda x, t: -F.cross_entropy(head(x).float(), t, reduction="none")  # fp32 log-softmax (pitfall 7)
        pieces = []
        for i in range(0, len(targets), fast.CHUNK):
            args = (hidden[i:i + fast.CHUNK], targets[i:i + fast.CHUNK])
            pieces.append(checkpoint(logps, *args, use_reentrant=False) if torch.is_grad_enabled() else logps(*args))
        return torch.cat(pieces)

    def attention(module, query, key, value, attention_mask, **kwargs):
        """transformers' SDPA, given no mask: causal (full for one query)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    def body(model, ids):  # (R, T, H): no mask, no output layer
        body = getattr(model, "fsdp_body", None) or model.base_model
        return body(input_ids=ids, use_cache=False).last_hidden_state

    def probe(model, max_length, device):
        """Is the fast path exact? It drops the mask (wrong for a short window, or not SDPA) and takes the logits as
        they are (wrong if scaled or capped): kept if two random rows agree."""
        from transformers import AttentionInterface
        window, head = getattr(model.config, "sliding_window", None), model.get_output_embeddings()
        model.fast_logps = False
        if model.config._attn_implementation != "sdpa" or head is None or (window is not None and window < max_length):
            return
        length = min(64, max_length, getattr(model.config, "max_position_embeddings", None) or 64)
        ids = torch.randint(model.get_input_embeddings().num_embeddings, (length,),
                            generator=torch.Generator().manual_seed(0))  # the global RNG left alone
        probe = fast.to_device(collate_sequences([ids, ids[:length // 2]], [1, 1], pad_id=0), device)
        was_training, weight = model.training, head.weight.detach().clone()
        tol = 2e-2 if device.type == "cuda" or weight.dtype == torch.bfloat16 else 1e-4  # nats per token: rounding
        model.eval()
        AttentionInterface.register("causal_sdpa", fast.attention)
        with torch.no_grad(), autocast(device):
            logits = model(probe["input_ids"], use_cache=False).logits.float()
            # logits as large as a trained model's: scaled up to std 10 (tied embeddings: the input's too)
            head.weight.mul_(max(1.0, 10 / float(logits.std())))
            own, n = sequence_logps(model, probe)
            try:
                model.set_attn_implementation("causal_sdpa")
                model.fast_logps = True
                agrees = bool(((sequence_logps(model, probe)[0] - own).abs() <= tol * n).all())
            except Exception:  # parts that do not fit (base_model is the model)
                agrees = False
            head.weight.copy_(weight)
        if not agrees:
            model.set_attn_implementation("sdpa")
        model.fast_logps = agrees
        model.train(was_training)

# --- AdamWSR: --weights=bf16 (pitfall 12)

def stochastic_round_bf16_(x, noise):
    """Flat fp32 x -> bf16 that is x in expectation, a view of x's top halves; noise: int32 in [0, 2^16). Random low
    bits carry into the top 16 with probability (x - the bf16 below) / spacing."""
    x.view(torch.int32).add_(noise)
    return x.view(torch.int16).view(-1, 2)[:, 1].view(torch.bfloat16)  # little-endian: the 2nd int16 is the top

class AdamWSR(torch.optim.Optimizer):
    """AdamW (no weight decay), state in the parameters' dtype, fp32 math, rounded back stochastically: to nearest,
    a step of 5e-7 on a bf16 weight of 0.02 (spacing 1.2e-4) is lost. Pieces of `chunk` reuse buffers (28 B each)."""

    chunk = 1 << 25

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.work = {}  # the reusable buffers

    def random_bits(self, n, device):  # n int64s, each 63 random bits, of which update uses 48
        return self.buffer("bits", n, torch.int64, device).random_()

    def buffer(self, name, n, dtype, device):
        if name not in self.work or self.work[name].numel() < n or self.work[name].device != device:
            self.work[name] = torch.empty(n, dtype=dtype, device=device)
        return self.work[name][:n]

    @torch.no_grad()
    def step(self, closure=None):  # closure: unused (distributed.checkpoint passes it)
        for group in self.param_groups:
            for p in [p for p in group["params"] if p.grad is not None]:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] = int(state["step"]) + 1  # a Python int: no host sync
                tensors = [t.to_local() if hasattr(t, "to_local") else t for t in
                           (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for pieces in zip(*(t.view(-1).split(self.chunk) for t in tensors)):
                    self.update(*pieces, group, state["step"])

    def update(self, w_, g_, m_, v_, group, t):  # one piece: fp32, AdamW, rounded back
        (beta1, beta2), n, device = group["betas"], w_.numel(), w_.device
        w, g, m, v = (self.buffer(k, n, torch.float32, device).copy_(x) for k, x in zip("wgmv", (w_, g_, m_, v_)))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = torch.div(v, 1 - beta2 ** t, out=g).sqrt_().add_(group["eps"])  # g is done with: reused
        w.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
        words = self.random_bits(n, device).view(torch.int32).view(n, 2)  # an int64 serves three roundings
        noise = self.buffer("noise", n, torch.int32, device)
        for k, (x, dst) in enumerate(((w, w_), (m, m_), (v, v_))):
            if dst.dtype != torch.bfloat16:
                dst.copy_(x)
                continue
            word = torch.bitwise_right_shift(words[:, 0], 16, out=noise) if k == 1 else words[:, k // 2]
            dst.copy_(stochastic_round_bf16_(x, torch.bitwise_and(word, 0xFFFF, out=noise)))

# --- cache and RunFolder

@contextlib.contextmanager
def room_for(path, needed, partial=None):
    """A failed write (a full disk) is one sentence naming the folder and the space needed; no partial file stays."""
    folder = os.path.dirname(os.path.abspath(path))
    free, MB = shutil.disk_usage(folder).free, 2 ** 20
    try:
        if free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield
    except (OSError, RuntimeError) as e:  # torch.save's failed write is a RuntimeError
        with contextlib.suppress(OSError, TypeError):
            (shutil.rmtree if os.path.isdir(partial) else os.remove)(partial)
        raise FocalpoError(f"could not write {path} ({getattr(e, 'strerror', None) or first_line(e)[:80]}): {folder} "
                           f"has {free / MB:.1f} MB free and the write needs about {needed / MB:.1f} MB; make room "
                           f"(or choose another folder), then run the same command with --resume=true") from None

def nbytes(x):  # the bytes of the tensors in nested dicts and lists
    if isinstance(x, (dict, list, tuple)):
        return sum(map(nbytes, x.values() if isinstance(x, dict) else x))
    return x.nbytes if torch.is_tensor(x) else 0

class cache:
    def key(fields):
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

    def used_pairs(cfg, train_pairs):  # the training pairs the run's seeded steps will use
        steps = step_stream(train_pairs, cfg, skip=0)
        used = {p.idx for _ in range(run_steps(cfg, len(train_pairs))) for batch in next(steps) for p in batch}
        return [p for p in train_pairs if p.idx in used]

    def reference(cfg, model, train_pairs, eval_pairs, pad_id, device, log):
        """pair_logps of the training pairs the run uses (−inf for the others: no step reads them) and of the held-out
        pairs, cached by what changes them: the weights, the tokens, the forward."""
        used = cache.used_pairs(cfg, train_pairs)
        key, fields = cache.reference_key(cfg, model, used, eval_pairs, device)
        path = os.path.join(cfg.cache_dir, f"ref_{key}.pt")
        cached = cache.read(path, "reference", log)
        if cached is not None:
            return cached["tensors"]["train"], cached["tensors"]["eval"]
        log(f"reference: scoring the {len(used)} training pairs the {run_steps(cfg, len(train_pairs))} steps use"
            + (f" (of {len(train_pairs)})" if len(used) < len(train_pairs) else "")
            + f" and {len(eval_pairs)} held-out pairs with the initial weights")
        t0 = time.time()
        train_ref = pair_logps(model, scoring_batches(used, cfg.batch_size, pad_id), len(train_pairs), device)
        eval_ref = pair_logps(model, scoring_batches(eval_pairs, cfg.batch_size, pad_id), len(eval_pairs), device)
        cache.write({"fields": fields, "tensors": {"train": train_ref, "eval": eval_ref}}, path)
        log(f"reference: done in {time.time() - t0:.1f}s, saved to {path}")
        return train_ref, eval_ref

    def reference_key(cfg, model, train_used, eval_pairs, device):
        """(a hash, fields): the model, its weights, each pair's index, tokens and response start (data, tokenizer,
        template, lengths), the forward's device, dtype, path and class."""
        data = hashlib.sha256()
        for pairs in (train_used, eval_pairs):
            for pair in pairs:
                data.update(pair.chosen.numpy().tobytes() + pair.rejected.numpy().tobytes())
                data.update(f"{pair.idx},{pair.chosen_start},{pair.rejected_start};".encode())
            data.update(b"|")
        compute = [device.type, str(next(model.parameters()).dtype), "fast" if getattr(model, "fast_logps", 0) else
                   "own", type(model).__name__]  # FSDP's class (FSDPLlama...): its own bf16
        fields = {"model": cfg.model, "weights": cache.fingerprint(model), "data": data.hexdigest()[:16],
                  "n_train_scored": len(train_used), "n_eval": len(eval_pairs), "compute": compute, "version": 5}
        return cache.key(fields), fields

    def write(blob, path):  # to a temporary name, renamed: a file with its final name is whole
        if procs.rank() != 0:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # its own name: runs may share a cache folder
        with room_for(path, nbytes(blob), partial=tmp):
            torch.save(blob, tmp)
        os.replace(tmp, path)  # a crash mid-save leaves the old file as it was

    def read(path, what, log, everywhere=True):
        """What write() saved in `path`, or None; everywhere: if all processes have it."""
        blob = None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            log(f"{what}: loaded cached values from {path}")
        except FileNotFoundError:
            pass
        except Exception as e:
            log(f"{what}: WARNING: ignoring the cache file {path}: it cannot be read ({type(e).__name__}); recomputing")
        return blob if not everywhere or procs.agree(blob is not None, "min") else None

    @torch.no_grad()
    def fingerprint(model):  # two sums a tensor
        h = hashlib.sha256()
        for name, p in model.named_parameters():
            x = procs.full(p).float()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{x.sum().item():.9e}{x.abs().sum().item():.9e}".encode())
        return h.hexdigest()[:16]

def latest_checkpoint(folder):  # (the newest checkpoint, mapped; its path) or (None, None)
    if not (paths := sorted(glob.glob(os.path.join(folder, "step_*.pt")))):
        return None, None
    try:
        return torch.load(paths[-1], map_location="cpu", weights_only=True, mmap=True), paths[-1]
    except Exception as e:
        raise FocalpoError(f"checkpoint {paths[-1]} does not load ({first_line(e)}): delete it to resume from "
                           f"the one before, or start a new --out_dir") from None

class RunFolder:
    """One loss's metrics.jsonl and checkpoints (full tensors: any number of processes resumes; two kept)."""

    def __init__(self, out_dir, model, optimizer, cfg, loss_type, n_steps):
        self.folder, self.metrics = os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "metrics.jsonl")
        self.model, self.optimizer, self.cfg, self.loss_type, self.n_steps = model, optimizer, cfg, loss_type, n_steps
        self.last = None
        os.makedirs(out_dir, exist_ok=True)

    def append(self, row):  # one line of metrics.jsonl, written at once
        if procs.rank() == 0:
            with room_for(self.metrics, len(line := json.dumps(row) + "\n")), open(self.metrics, "a") as f:
                f.write(line)

    def save(self, state, keep=2):
        path = os.path.join(self.folder, f"step_{state['step']:07d}.pt")
        if path == self.last:  # saved (a signal came during its write)
            return path
        weights, optimizer = procs.full_state(self.model, self.optimizer)
        state = dict(state, window=procs.sums_to_host(state["window"]))  # several processes: their sums
        blob = {"model": weights, "optimizer": optimizer, "state": state, "config": dataclasses.asdict(self.cfg),
                "loss_type": self.loss_type, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        cache.write(blob, path)
        if procs.rank() == 0:
            for old in sorted(glob.glob(os.path.join(self.folder, "step_*.pt")))[:-keep]:
                os.remove(old)
        self.last = path
        return path

    def resume(self, log):
        """The newest checkpoint's weights, optimizer, RNG and state, metrics.jsonl cut back to it; or new_state()."""
        import torch.distributed.checkpoint.state_dict as dcp
        ckpt, self.last = latest_checkpoint(self.folder)
        if ckpt is None:
            log(f"[{self.loss_type}] --resume: no checkpoint in {self.folder}, starting from the beginning")
            self.cut_metrics(-1, log=lambda msg: None)
            return new_state()
        full = dcp.StateDictOptions(full_state_dict=True)  # each process takes its shard of the full tensors
        dcp.set_model_state_dict(self.model, ckpt["model"], options=full)
        dcp.set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"], options=full)
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        state = ckpt["state"]
        if procs.rank() != 0:  # the saved sums are all processes': the first carries them
            state["window"] = dict.fromkeys(state["window"], 0.0)
        self.cut_metrics(state["step"], log)
        log(f"[{self.loss_type}] resumed from {self.last} at step {state['step']} of {self.n_steps}")
        return state

    def cut_metrics(self, step, log):  # metrics.jsonl's rows up to `step`; a torn line or no file said
        if procs.rank() != 0:
            return
        if not (lines := open(self.metrics).readlines() if os.path.exists(self.metrics) else []):
            log(f"WARNING: {self.metrics} is missing or empty: its rows up to step {step} are lost")
        with open(self.metrics, "w") as f:
            for line in lines:
                try:
                    f.write(line if json.loads(line)["step"] <= step else "")
                except ValueError:
                    log(f"WARNING: {self.metrics}: dropped a line that was cut short ({line.strip()[:40]!r}...)")

class output:
    def ranking_sums(chosen, rejected, n_tokens, ref):
        """Ranking accuracy (Chen et al. 2024, arXiv 2405.19534; a tie is right): loss_and_metrics says which."""
        B = len(ref)
        ranked, ref_right = chosen >= rejected, ref[:, 0] >= ref[:, 1]
        count = lambda x: x.float().sum()
        return {"ranking_accuracy": count(ranked),
                "ranking_accuracy_norm": count(chosen / n_tokens[:B] >= rejected / n_tokens[B:]),
                "ranking_accuracy_ref_correct": count(ranked & ref_right), "pairs_ref_correct": count(ref_right),
                "ranking_accuracy_ref_incorrect": count(ranked & ~ref_right), "pairs_ref_incorrect": count(~ref_right)}

    def metric_means(total):  # sums -> means over pairs (a reference group's: its own, None if none)
        n = lambda k: total[k.replace("ranking_accuracy", "pairs")] if "accuracy_ref" in k else total["pairs"]
        counts = ("pairs", "response_tokens", "pairs_ref_correct", "pairs_ref_incorrect")
        return {k: int(v) if k in counts else v / n(k) if n(k) else None for k, v in total.items()}

    def save_model(model, tokenizer, out_dir):
        """save_pretrained into a folder of its own, then moved: a file with its final name is whole."""
        weights = procs.full_state(model)[0] if procs.world() > 1 else None
        if procs.rank() == 0:
            tmp = os.path.join(out_dir, ".model.tmp")
            with room_for(os.path.join(out_dir, "model.safetensors"), nbytes(weights or model.state_dict()), tmp):
                model.save_pretrained(tmp, state_dict=weights)
                tokenizer.save_pretrained(tmp)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
            os.rmdir(tmp)

    def finish(cfg, state, loss_type, n_pairs, out_dir):
        """summary.json, written last (it means "done"); then the checkpoints go, unless kept."""
        first, last, seconds = state["first_eval"], state["last_eval"], state["train_seconds"]
        summary = {"loss_type": loss_type, "steps": state["step"], "train_pairs": n_pairs[0], "eval_pairs": n_pairs[1],
                   "lr": peak_lr(cfg), **{f"eval_{k}_start": first.get(k) for k in
                                          ("loss", "reward_accuracy", "generation_accuracy")},
                   **{f"eval_{k}": v for k, v in last.items()},
                   "train_tokens_per_second": state["tokens_seen"] / seconds if seconds else None,
                   "train_seconds": seconds, "loop_seconds": state["loop_seconds"], "config": dataclasses.asdict(cfg)}
        if procs.rank() == 0:
            path, text = os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2)
            with room_for(path, len(text), path), open(path, "w") as f:
                f.write(text)
            if not cfg.keep_final_checkpoint:
                shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
        return summary

    TABLE = {"eval_reward_accuracy_start": "reward acc @0", "eval_reward_accuracy": "reward acc",
             "eval_rewards/margin": "margin", "eval_ranking_accuracy": "rank acc",
             "eval_ranking_accuracy_ref_correct": "rank acc (ref right)",
             "eval_ranking_accuracy_ref_incorrect": "rank acc (ref wrong)", "eval_logps/chosen": "logp chosen",
             "eval_logps/rejected": "logp rejected", "eval_generation_accuracy_start": "gen acc @0",
             "eval_generation_accuracy": "gen acc"}

    def comparison_table(summaries):
        cols = {k: max(8, len(c) + 2) for k, c in output.TABLE.items()
                if any(s.get(k) is not None for s in summaries.values())}
        lines = ["", f"held-out results ({next(iter(summaries.values()))['eval_pairs']} pairs)",
                 f"{'loss':<19}" + "".join(f"{output.TABLE[k]:>{w}}" for k, w in cols.items())]
        for lt, s in summaries.items():
            name = lt + (" (detached)" if lt == "focalpo" and s["config"]["focal_detach"] else "")
            cells = (f"{'-' if s.get(k) is None else format(s[k], '.3f'):>{w}}" for k, w in cols.items())
            lines.append(f"{name:<19}" + "".join(cells))
        return "\n".join(lines)

    def plot(cfg, log):  # curves.png: each loss's held-out (solid) and training metrics
        if procs.rank() != 0:
            return
        try:
            from matplotlib.figure import Figure  # not pyplot: no window, no global state
        except ImportError:
            return log("no curves.png: matplotlib is not installed")
        fig, path = Figure(figsize=(16, 3.4), layout="constrained"), os.path.join(cfg.out_dir, "curves.png")
        axes = fig.subplots(1, 4)
        for i, lt in enumerate(loss_types(cfg)):
            rows = [json.loads(line) for line in open(os.path.join(loss_dir(cfg, lt), "metrics.jsonl"))]
            for split, style, name in (("eval", "-", "held-out"), ("train", "--", "training")):
                part = [r for r in rows if r["split"] == split]
                for ax, k in zip(axes, ("reward_accuracy", "rewards/margin", "logps/chosen", "logps/rejected")):
                    ax.plot([r["step"] for r in part], [r[k] for r in part], style, color=f"C{i}", marker=".",
                            lw=max(1, 3 - i), label=f"{lt}, {name}")
                    ax.set(title=k, xlabel="step")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
        with room_for(path, 2 ** 20, path):
            fig.savefig(path, dpi=100)
        log(f"curves: {path}")

    @torch.no_grad()
    def greedy_completions(model, pairs, tokenizer, device, max_new_tokens, batch_size=256):
        """(the prompt, its text up to the first EOS, whether one came) per pair; batched by length: no padding."""
        prompts = [p.chosen[:p.chosen_start] for p in pairs]
        was_training, eos, out, by_length = model.training, tokenizer.eos_token_id, [None] * len(prompts), {}
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
                                         synced_gpus=procs.world() > 1)[:, ids.shape[1]:]  # FSDP: all steps
                for i, row in zip(idx, new.tolist()):
                    end = row.index(eos) if eos in row else len(row)
                    out[i] = (tokenizer.decode(prompts[i], skip_special_tokens=True),
                              tokenizer.decode(row[:end], skip_special_tokens=True), end < len(row))
        procs.reshard(model)
        model.train(was_training)
        return out

    def show_generations(model, pairs, tokenizer, cfg, device, label, log, max_new_tokens=128):
        """--generate=N: the first N held-out prompts, greedy completions (the demo: right or not)."""
        n = cfg.generate if cfg.generate >= 0 else (5 if cfg.dataset == "demo" else 0)
        for prompt, text, ended in output.greedy_completions(model, pairs[:n], tokenizer, device, max_new_tokens):
            line = f"{label} {prompt[-200:]!r} -> {text!r}{'' if ended else ' (no EOS)'}"
            if cfg.dataset == "demo":
                right = demo.is_right(prompt, text, ended)
                line += "   right" if right else f"   wrong: expected {demo.answer(prompt)!r}"
            log(line)

# --- Guard

class Interrupted(FocalpoError):
    """Ctrl-C or SIGTERM in training: a checkpoint saved."""

class Guard:
    """Stops training in one sentence, saving what it can: Ctrl-C or SIGTERM (the step ends; a second stops at once),
    out of GPU memory, MAX_BAD_STEPS NaN/inf steps in a row (each skipped, its rows named)."""

    MAX_BAD_STEPS = 3

    def __init__(self, folder, state, ref, device, say):
        self.folder, self.state, self.ref, self.device, self.say = folder, state, ref, device, say
        self.signal, self.old, self.bad_steps = None, {}, 0

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self.old[sig] = signal.signal(sig, self.on_signal)
        return self

    def on_signal(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, kind, e, tb):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            self.folder.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            step, cfg = self.state["step"], self.folder.cfg
            saved = f"; checkpoint saved to {self.folder.save(self.state)}, continue with --resume=true" if step else ""
            raise FocalpoError(
                f"out of GPU memory at step {step + 1} with --batch_size={cfg.batch_size} pairs of up to "
                f"--max_length={cfg.max_length} tokens: lower --batch_size (raising --grad_accum to keep the batch), "
                f"set --gradient_checkpointing=true, or lower --max_length{saved}") from None

    def after_step(self, applied, micro):
        step = self.state["step"]
        self.bad_steps = 0 if applied else self.bad_steps + 1
        if not applied:
            rows = ", ".join(self.nonfinite_rows(micro)) or "none: the gradient only"
            self.say(f"[{self.folder.loss_type}] step {step}: WARNING: non-finite loss or gradient, update skipped "
                     f"(training rows: {rows})")
            if self.bad_steps >= Guard.MAX_BAD_STEPS:
                raise FocalpoError(f"{self.bad_steps} consecutive steps had a non-finite loss or gradient (the "
                                   f"last at step {step}, training rows: {rows}): check those rows or lower --lr. " +
                                   (f"The last good checkpoint is {self.folder.last} (--resume=true)."
                                    if self.folder.last else "No checkpoint yet."))
        if procs.agree(self.signal is not None, "max") and step < self.folder.n_steps:  # all stop here
            by = signal.Signals(self.signal).name if self.signal else "a signal to another process"
            raise Interrupted(f"stopped by {by} at step {step} of {self.folder.n_steps}; checkpoint saved to "
                              f"{self.folder.save(self.state)}. To continue, run the same command with --resume=true")

    @torch.no_grad()
    def nonfinite_rows(self, micro):
        """Where the step's pairs with a NaN/inf loss came from (their losses again; all processes')."""
        model, cfg, pairs = self.folder.model, self.folder.cfg, []
        for batch in micro:
            losses, _ = forward_pairs(model, batch, self.ref, cfg, self.folder.loss_type, self.device)
            pairs += [batch["where"][i] for i in (~torch.isfinite(losses)).nonzero()[:, 0].tolist()]
        return procs.gather_lists(pairs)

# --- procs: several processes (torchrun), FSDP2

class procs:
    def pick_device():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CUDA_VISIBLE_DEVICES= for the CPU

    def rank():
        return dist.get_rank() if dist.is_initialized() else 0

    def world():
        return dist.get_world_size() if dist.is_initialized() else 1

    def setup(cfg, log):
        """(device, log: the first process's); under torchrun, the group (NCCL or gloo; a timeout ends hangs)."""
        device, n = procs.pick_device(), int(os.environ.get("WORLD_SIZE", "1"))
        if n <= 1:
            return device, log
        from torch.distributed import fsdp
        if not hasattr(getattr(fsdp, "FSDPModule", None), "set_force_sum_reduction_for_comms"):
            raise FocalpoError(f"several processes need torch 2.8 or newer (its FSDP2), and this is torch "
                               f"{torch.__version__}: upgrade torch, or run one process")
        if cfg.grad_accum % n:
            raise FocalpoError(f"--grad_accum={cfg.grad_accum} is not a multiple of the {n} processes, which share "
                               f"each step's micro-batches: use --grad_accum={n * math.ceil(cfg.grad_accum / n)}")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=cfg.dist_timeout))
            atexit.register(dist.destroy_process_group)
        log = log if procs.rank() == 0 else (lambda msg: None)
        log(f"several processes: each loss's model is sharded over {n} processes (FSDP2) with {dist.get_backend()}")
        return device, log

    def shard(model, device):
        """FSDP2 over each decoder layer, then the model; bf16 compute on CUDA as with autocast; gradients SUMMED."""
        if procs.world() == 1:
            return model
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        bf16 = device.type == "cuda" and next(model.parameters()).dtype == torch.float32
        mp = MixedPrecisionPolicy(**dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {})
        for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum, do not average
                m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled reduction
        if model.fast_logps:  # the root's weights gathered for the body
            model.fsdp_body = model.base_model.__call__
            register_fsdp_forward_method(model, "fsdp_body")
        register_fsdp_forward_method(model, "generate")
        return model.to(device)

    def my_share(items):
        """Items r, r+N, ... for process r of N, a short share padded (under FSDP each forward is collective)."""
        n = procs.world()
        return [items[i % len(items)] for i in range(procs.rank(), math.ceil(len(items) / n) * n, n)]

    def sums_to_host(total):  # {name: a sum} as floats, in one copy to the host (one wait)
        if not total:
            return {}
        keys = sorted(total)
        device = next((v.device for v in total.values() if torch.is_tensor(v)), None)  # "pairs" is a float: moved too
        values = torch.stack([torch.as_tensor(total[k], dtype=torch.float32, device=device) for k in keys])
        return dict(zip(keys, procs.all_reduce(values).tolist()))

    def all_reduce(t, op="sum"):  # t summed (or max, min) over the processes, in place
        if procs.world() == 1:
            return t
        x = t.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device)
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op.upper()))
        return t.copy_(x)

    def agree(flag, op):  # a bool all processes share: any ("max") or all ("min") of theirs
        if procs.world() == 1:
            return bool(flag.item() if torch.is_tensor(flag) else flag)
        return bool(procs.all_reduce(torch.as_tensor(flag, dtype=torch.float32).reshape(1), op).item())

    def gather_scores(model, logps):  # a pair's score on one process, −inf on the others: max
        procs.reshard(model)
        return procs.all_reduce(logps, "max")

    def gather_lists(items):  # every process's list, joined
        gathered = [items] * procs.world()
        if procs.world() > 1:
            dist.all_gather_object(gathered, items)
        return sum(gathered, [])

    def full(t):  # a sharded tensor (DTensor) whole; any other as it is
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def sync_gradients(model, now):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(now)

    def reshard(model):  # FSDP keeps the root's weights gathered after a no-grad forward
        if hasattr(model, "reshard"):
            model.reshard()

    @contextlib.contextmanager
    def rank0_first():  # the first process runs the block (and caches) first
        if procs.rank() != 0:
            dist.barrier()
        yield
        if procs.rank() == 0 and procs.world() > 1:
            dist.barrier()

    def full_state(model, optimizer=None):  # (model, optimizer) state dicts; several processes: full, on the host
        import torch.distributed.checkpoint.state_dict as dcp
        options = dcp.StateDictOptions(full_state_dict=procs.world() > 1, cpu_offload=procs.world() > 1)
        return (dcp.get_model_state_dict(model, options=options),
                optimizer and dcp.get_optimizer_state_dict(model, optimizer, options=options))

if __name__ == "__main__":
    main()
