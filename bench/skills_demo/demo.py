"""Real-data demonstration of skill blending (docs/reports/skills.md): data preparation and scoring.

Three skills from the staged data under ``$LORAMIX_DATA_DIR``:

* ``sentiment``: SST-2 (``sst2/sst2_{train,test}.tsv``), answer ``positive`` / ``negative``;
* ``summary``: DialogSum (``summarization/dialogsum``; the dev split trains, the test split evaluates);
* ``boolq``: BoolQ as staged by LLM-Adapters (``llm_adapters_commonsense/boolq``), answer
  ``the correct answer is true`` / ``... false``.

Usage::

    python -m bench.skills_demo.demo prepare OUT_DIR                # writes <skill>_{train,test}.jsonl
    python -m bench.skills_demo.demo instructions SKILL             # its seed phrasings, JSON
    python -m bench.skills_demo.demo evaluate LIBRARY OUT_DIR --json results.json [--routing-only]

``evaluate`` loads every skill of the library onto one base (``SkillBlend``) and reports

* gate accuracy on held-out prompts (the test splits, never seen by the gate), in the training prompt
  template and reworded with the instructions of :mod:`bench.skills_demo.heldout` (written by hand, never used for
  training), and on its free-form single-skill prompts;
* on its mixed prompts (two skills asked for at once), the share where both get a weight of at least 0.25;
* each skill's score through the blend (gate routing, ``top1`` and ``soft``) beside the same skill's adapter
  alone (one-hot weights, identical to loading that adapter by itself) and the frozen base (all-zero
  weights). Classification skills score the answer choices by log-likelihood (accuracy); the summary skill
  generates greedily and is scored with ROUGE-L F1 (:func:`rouge_l`, no stemming) against ``summary1``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .heldout import MIXED, MIXED_FREE, REWORDED, SINGLE_FREE

SKILL_FILES = ("sentiment", "summary", "boolq")

SENTIMENT_PROMPT = "Classify the sentiment of this movie review as positive or negative: {text}"
SUMMARY_PROMPT = "Summarize this dialogue:\n{text}"
# Seed phrasings of each skill's request, given to `skills add --instructions` (the gate is trained on these and on
# the data's own template, in many layouts: loramix.skills.phrasings). Written without looking at the held-out
# wordings of bench.skills_demo.heldout; tests/test_skills_demo.py checks that none of those appears here.
SEED_INSTRUCTIONS = {
    "sentiment": ["Is this review positive or negative?", "What is the sentiment of this text?",
                  "Classify the sentiment", "Tell me whether the opinion here is positive or negative",
                  "Label the emotional tone of this statement", "Does the author sound happy or unhappy?"],
    "summary": ["Summarize this", "Write a short summary of the conversation", "Give a brief summary",
                "Sum up the main points of this text", "Describe what happened in a few words",
                "Summarize the dialogue in one sentence"],
    "boolq": ["Answer true or false", "Is the following statement true or false?", "Yes or no question",
              "Please answer with yes or no", "Is this true?", "Give a true/false answer to this question"],
}
_BOOLQ_Q = re.compile(r"question:\s*(.*?)\s*\n\s*\nAnswer format", re.S)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    d = data_dir or os.environ.get("LORAMIX_DATA_DIR")
    if not d:
        raise SystemExit("set LORAMIX_DATA_DIR (the directory holding sst2/, summarization/, ...) or pass --data-dir")
    return Path(d).expanduser()


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def boolq_question(instruction: str) -> str:
    """The bare question of an LLM-Adapters BoolQ instruction (for the paraphrased prompts)."""
    m = _BOOLQ_Q.search(instruction)
    return m.group(1).strip().rstrip("?") if m else instruction


def prepare(out_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
            seed: int = 0) -> dict[str, int]:
    """Write ``<skill>_train.jsonl`` (prompt/response, shuffled) and ``<skill>_test.jsonl`` (plus the fields
    the scorer needs: ``choices``/``gold`` or ``reference``, and ``raw`` for the paraphrased prompts)."""
    d = _data_dir(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {}

    labels = ["negative", "positive"]
    for split in ("train", "test"):
        with open(d / "sst2" / f"sst2_{split}.tsv") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        recs = [{"prompt": SENTIMENT_PROMPT.format(text=r["sentence"]), "response": labels[int(r["label"])],
                 "choices": labels, "gold": int(r["label"]), "raw": r["sentence"]} for r in rows]
        rng.shuffle(recs)
        if split == "train":
            recs = [{"prompt": r["prompt"], "response": r["response"]} for r in recs]
        _write(out / f"sentiment_{split}.jsonl", recs)
        counts[f"sentiment_{split}"] = len(recs)

    for split, name in (("train", "dev"), ("test", "test")):
        rows = _read_jsonl(d / "summarization" / "dialogsum" / f"dialogsum.{name}.jsonl")
        recs = [{"prompt": SUMMARY_PROMPT.format(text=r["dialogue"]),
                 "response": r.get("summary") or r["summary1"], "raw": r["dialogue"]} for r in rows]
        if split == "train":
            rng.shuffle(recs)
            recs = [{"prompt": r["prompt"], "response": r["response"]} for r in recs]
        else:  # shuffled once (seeded): `--score-limit` / `--route-limit` take a random fixed subset
            recs = [{**r, "reference": r["response"]} for r in recs]
            rng.shuffle(recs)
        _write(out / f"summary_{split}.jsonl", recs)
        counts[f"summary_{split}"] = len(recs)

    for split in ("train", "test"):
        with open(d / "llm_adapters_commonsense" / "boolq" / f"{split}.json") as f:
            rows = json.load(f)
        tf = ["the correct answer is true", "the correct answer is false"]
        recs = [{"prompt": r["instruction"], "response": r["output"], "choices": tf,
                 "gold": 0 if r["answer"].strip().lower() == "true" else 1,
                 "raw": boolq_question(r["instruction"])} for r in rows]
        rng.shuffle(recs)
        if split == "train":
            recs = [{"prompt": r["prompt"], "response": r["response"]} for r in recs]
        _write(out / f"boolq_{split}.jsonl", recs)
        counts[f"boolq_{split}"] = len(recs)
    return counts


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over lower-cased alphanumeric words, no stemming (``rouge_score`` is not
    installed here; with ``use_stemmer=False`` its tokenizer splits the same way)."""
    p, r = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


# --------------------------------------------------------------------------------------------------
# scoring through a blend
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def choice_logliks(blend: Any, prompts: list[str], choices: list[list[str]], weights: torch.Tensor | None,
                   batch_size: int = 8) -> list[list[float]]:
    """Summed log-probability of each choice as the assistant reply to each prompt (chat template as in
    training), with row ``i`` of ``weights`` blending the adapters for prompt ``i`` (None = frozen base).

    Choices of one item whose model inputs coincide (they differ only in their last token) share a forward.
    """
    from loramix.evaluation import encode_pair
    from loramix.generation import render_chat

    tok = blend.tokenizer
    n = len(prompts)
    w = torch.zeros(n, len(blend.skills)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    rows: dict[tuple[int, tuple[int, ...]], list[tuple[int, int, list[int]]]] = {}
    for i, (p, chs) in enumerate(zip(prompts, choices, strict=True)):
        text, add_special = render_chat(tok, [{"role": "user", "content": p}])
        for c, ch in enumerate(chs):
            ctx, cont = encode_pair(tok, text, ch, add_special_tokens=add_special)
            full = ctx + cont
            rows.setdefault((i, tuple(full[:-1])), []).append((i, c, cont))
    keys = sorted(rows, key=lambda k: len(k[1]), reverse=True)
    out = [[0.0] * len(chs) for chs in choices]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        width = len(chunk[0][1])
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (_, inp) in enumerate(chunk):
            ids[j, : len(inp)] = torch.tensor(inp)
            mask[j, : len(inp)] = 1
        logits = blend.logits(ids, w[[k[0] for k in chunk]], attention_mask=mask)
        for j, key in enumerate(chunk):
            length = len(key[1])
            for i, c, cont in rows[key]:
                m = len(cont)
                logp = F.log_softmax(logits[j, length - m : length].float(), dim=-1)
                out[i][c] = float(logp.gather(1, torch.tensor(cont)[:, None].to(logp.device)).sum())
    return out


def summary_rouge(blend: Any, items: list[dict[str, Any]], weights: torch.Tensor | None, *,
                  max_new_tokens: int = 64, batch_size: int = 8) -> tuple[float, list[str]]:
    """Mean ROUGE-L F1 of greedy generations (prompts batched by length) and the generated texts."""
    n = len(items)
    w = torch.zeros(n, len(blend.skills)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    order = sorted(range(n), key=lambda i: len(items[i]["prompt"]))
    texts = blend.generate([items[i]["prompt"] for i in order], w[order], max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=batch_size)
    result = [""] * n
    for i, t in zip(order, texts, strict=True):
        result[i] = t.strip()
    scores = [rouge_l(t, it["reference"]) for t, it in zip(result, items, strict=True)]
    return sum(scores) / n, result


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
def reworded(skill: str, items: list[dict[str, Any]]) -> list[str]:
    """The held-out reworded prompts of ``items`` (bench.skills_demo.heldout.REWORDED, rotated)."""
    templates = REWORDED[skill]
    return [templates[i % len(templates)].format(text=it["raw"]) for i, it in enumerate(items)]


def mixed_prompts(items: dict[str, list[dict[str, Any]]], names: list[str],
                  templates: list[tuple[tuple[str, ...], str, str]] = MIXED,
                  free: list[tuple[tuple[str, ...], str]] = MIXED_FREE) -> list[tuple[tuple[str, ...], str]]:
    """``(skills asked for, prompt)``: the mixed instructions ``templates`` (default: the held-out ones) filled
    with ``items`` of their source skill (that source's instructions rotated), then the complete prompts
    ``free``; only prompts whose skills are all in ``names``."""
    out = []
    for src in names:
        mine = [(asked, t) for asked, s, t in templates if s == src and all(a in names for a in asked)]
        for i, it in enumerate(items[src] if mine else []):
            asked, t = mine[i % len(mine)]
            out.append((asked, t.format(text=it["raw"])))
    return out + [(asked, p) for asked, p in free if all(a in names for a in asked)]


class EmbeddingCache:
    """Prompt embeddings of the frozen base, keyed by SHA-256 of (embedder spec, prompt), kept in one file.

    The embedder is the frozen base, so an embedding never changes when skills are added: evaluating a library
    again after a new skill re-embeds only the new prompts (long dialogues cost seconds each on a CPU).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path else None
        self.store: dict[str, torch.Tensor] = {}
        if self.path is not None and self.path.is_file():
            from safetensors.torch import load_file

            self.store = load_file(str(self.path))

    @staticmethod
    def key(spec: dict[str, Any], prompt: str) -> str:
        import hashlib

        return hashlib.sha256((json.dumps(spec, sort_keys=True) + "\0" + prompt).encode()).hexdigest()

    def embed(self, spec: dict[str, Any], prompts: list[str], **kwargs: Any) -> tuple[torch.Tensor, int]:
        """(embeddings, number of prompts actually embedded now)."""
        from loramix.skills.gate import embed_prompts

        keys = [self.key(spec, p) for p in prompts]
        todo = sorted({k: p for k, p in zip(keys, prompts, strict=True) if k not in self.store}.items())
        if todo:
            emb = embed_prompts(spec, [p for _, p in todo], **kwargs)
            self.store.update({k: e.clone() for (k, _), e in zip(todo, emb, strict=True)})
            if self.path is not None:
                from safetensors.torch import save_file

                self.path.parent.mkdir(parents=True, exist_ok=True)
                save_file(self.store, str(self.path))
        return torch.stack([self.store[k] for k in keys]), len(todo)


def _per_item_choice(blend: Any, items: list[dict[str, Any]], w: torch.Tensor | None, batch_size: int) -> list[float]:
    lls = choice_logliks(blend, [it["prompt"] for it in items], [it["choices"] for it in items], w,
                         batch_size=batch_size)
    return [float(max(range(len(ll)), key=ll.__getitem__) == it["gold"]) for ll, it in zip(lls, items, strict=True)]


def evaluate(library: str, data_dir: str, *, route_limit: dict[str, int] | int = 200,
             score_limit: dict[str, int] | None = None, routing_only: bool = False, max_new_tokens: int = 64,
             batch_size: int = 8, cache: str | None = None, mixed_per_source: int = 24,
             score_prompts: str = "reworded", gate_temperature: float | None = None,
             log: Any = print) -> dict[str, Any]:
    """Held-out gate accuracy and per-skill scores (base / own adapter / top-1 blend / soft blend).

    ``blend_top1`` applies one-hot weights; on the items the gate routes to their own skill those weights are
    identical to ``own_adapter``'s, so only the misrouted items are run again (the scores of the others are
    the own-adapter ones; tests/test_skills.py checks that one-hot weights reproduce the adapter alone).
    """
    from loramix.skills.api import gate_weights, load_gate
    from loramix.skills.blend import SkillBlend
    from loramix.skills.gate import apply_policy
    from loramix.skills.library import SkillLibrary

    score_limit = score_limit or {}
    embed_cache = EmbeddingCache(cache)
    lib = SkillLibrary.open(library)
    names = lib.names
    unknown = [n for n in names if n not in SKILL_FILES]
    if unknown:
        raise SystemExit(f"no demo test data for skills {unknown} (known: {SKILL_FILES})")
    t0 = time.perf_counter()
    blend = SkillBlend.from_library(lib, names)
    gate = load_gate(lib)
    log(f"loaded {names} in {time.perf_counter() - t0:.1f}s")
    results: dict[str, Any] = {"library": str(library), "skills": names, "gate_history": gate.history,
                               "embedder": lib.manifest["embedder"], "routing": {}, "scores": {},
                               "score_prompts": score_prompts}
    weights: dict[tuple[str, str], torch.Tensor] = {}
    tests = {n: _read_jsonl(Path(data_dir) / f"{n}_test.jsonl") for n in names}
    spec = lib.manifest["embedder"]

    def route(prompts: list[str]) -> tuple[torch.Tensor, int, float]:
        t = time.perf_counter()
        emb, fresh = embed_cache.embed(spec, prompts, base=blend.model, tokenizer=blend.tokenizer)
        return gate_weights(gate, emb, names, gate_temperature), fresh, round(time.perf_counter() - t, 1)

    for variant in ("template", "reworded"):
        for k, name in enumerate(names):
            limit = route_limit if isinstance(route_limit, int) else route_limit.get(name, 200)
            items = tests[name][:limit]
            prompts = [it["prompt"] for it in items] if variant == "template" else reworded(name, items)
            w, fresh, secs = route(prompts)
            weights[(variant, name)] = w
            top = w.argmax(-1)
            rec = {"n": len(prompts), "accuracy": float((top == k).float().mean()),
                   "mean_weight_own": float(w[:, k].mean()), "min_weight_own": float(w[:, k].min()),
                   "routed_to": {m: int((top == j).sum()) for j, m in enumerate(names)},
                   "embedded_now": fresh, "seconds": secs}
            results["routing"].setdefault(variant, {})[name] = rec
            log(f"routing [{variant}] {name}: {json.dumps(rec)}")
    free = [(s, p) for s, p in SINGLE_FREE if s in names]
    if free:
        w, _, _ = route([p for _, p in free])
        hits = [names[int(w[i].argmax())] == s for i, (s, _) in enumerate(free)]
        results["routing"]["single_free"] = {"n": len(free), "accuracy": sum(hits) / len(free),
                                             "misrouted": [p[:60] for (_, p), h in zip(free, hits, strict=True)
                                                           if not h]}
        log(f"routing [single_free]: {json.dumps(results['routing']['single_free'])}")
    mixed = mixed_prompts({s: tests[s][:mixed_per_source] for s in names}, names)
    if mixed:
        w, _, _ = route([p for _, p in mixed])
        rows = []
        for i, (asked, p) in enumerate(mixed):
            ws = {n: round(float(w[i, j]), 4) for j, n in enumerate(names)}
            rows.append({"asked": list(asked), "both_weighted": all(ws[a] >= 0.25 for a in asked),
                         "weights": ws, "prompt": p[:100]})
        by_pair: dict[str, list[bool]] = {}
        for r in rows:
            by_pair.setdefault("+".join(r["asked"]), []).append(r["both_weighted"])
        results["routing"]["mixed"] = {
            "n": len(rows), "both_weighted_share": sum(r["both_weighted"] for r in rows) / len(rows),
            "by_pair": {k: {"n": len(v), "both_weighted_share": sum(v) / len(v)} for k, v in by_pair.items()},
            "free": rows[len(rows) - sum(1 for a, _ in MIXED_FREE if all(x in names for x in a)):]}
        log(f"routing [mixed]: {json.dumps({k: v for k, v in results['routing']['mixed'].items() if k != 'free'})}")
    if routing_only:
        return results
    for k, name in enumerate(names):
        n = score_limit.get(name, 100)
        items = tests[name][:n]
        if score_prompts == "reworded":
            items = [{**it, "prompt": p} for it, p in zip(items, reworded(name, items), strict=True)]
        gw = weights[(score_prompts, name)][:n]
        if gw.shape[0] < len(items):
            raise SystemExit(f"{name}: score limit {n} exceeds the route limit {gw.shape[0]}")
        own = F.one_hot(torch.full((len(items),), k), len(names)).float()
        configs = {
            "base": None,
            "own_adapter": own,
            "blend_top1": apply_policy(gw, names, mode="top1").applied,
            "blend_soft": apply_policy(gw, names, mode="soft").applied,
        }
        rec: dict[str, Any] = {"n": len(items), "metric": "rouge_l_f1" if name == "summary" else "accuracy"}
        per_item: dict[str, list[float]] = {}
        texts: dict[str, list[str]] = {}
        for cname, w in configs.items():
            t = time.perf_counter()
            idx = list(range(len(items)))
            if cname == "blend_top1":  # reuse own_adapter where the weights are the same one-hot row
                idx = [i for i in idx if not torch.equal(w[i], own[i])]
                rec["blend_top1_rerun_items"] = len(idx)
            sub = [items[i] for i in idx]
            sub_w = None if w is None else w[idx]
            scores: list[float] = []
            outs: list[str] = []
            if sub:
                if name == "summary":
                    _, outs = summary_rouge(blend, sub, sub_w, max_new_tokens=max_new_tokens, batch_size=batch_size)
                    scores = [rouge_l(o, it["reference"]) for o, it in zip(outs, sub, strict=True)]
                else:
                    scores = _per_item_choice(blend, sub, sub_w, batch_size)
            if cname == "blend_top1":
                full, full_txt = list(per_item["own_adapter"]), list(texts.get("own_adapter", []))
                for j, i in enumerate(idx):
                    full[i] = scores[j]
                    if full_txt:
                        full_txt[i] = outs[j]
                scores, outs = full, full_txt
            per_item[cname], texts[cname] = scores, outs
            rec[cname] = round(100 * sum(scores) / len(items), 2)
            rec[f"{cname}_seconds"] = round(time.perf_counter() - t, 1)
            log(f"score {name} {cname}: {rec[cname]} ({rec[f'{cname}_seconds']}s)")
        if name == "summary":
            rec["examples"] = [{"reference": it["reference"], **{c: texts[c][i] for c in configs}}
                               for i, it in enumerate(items[:3])]
        results["scores"][name] = rec
    return results


# --------------------------------------------------------------------------------------------------
# representation and gate comparison (no adapters needed)
# --------------------------------------------------------------------------------------------------
GATE_VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    # (name, GateConfig options, trained on generated + composed prompts too)
    ("softmax, data prompts only, frozen, wd 1e-4", {"objective": "softmax", "update": "frozen",
                                                     "weight_decay": 1e-4}, False),
    ("softmax, + generated + composed, joint, wd 1e-2", {"objective": "softmax"}, True),
    ("sigmoid, data prompts only, joint, wd 1e-2", {}, False),
    ("sigmoid, + generated + composed, frozen, wd 1e-2", {"update": "frozen"}, True),
    ("sigmoid, + generated + composed, joint, wd 1e-4", {"weight_decay": 1e-4}, True),
    ("sigmoid, + generated + composed, joint, wd 1e-2 (default)", {}, True),
]


def dev_items(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The development set's items of a skill: the LAST ``n`` of its shuffled test split (held-out measurements
    take the first ones), in order from the end."""
    return list(reversed(items[-n:])) if n > 0 else []


def _eval_prompts(test: dict[str, list[dict[str, Any]]], skills: list[str], prompt_set: str, lim: dict[str, int],
                  per_source: int) -> tuple[dict[str, list[str]], list[tuple[tuple[str, ...], str]], list[str]]:
    """Prompts to score gates on: ``{"evaltmpl/<s>", "evalrew/<s>", "evalmix", "evalfree"}``, the skills each
    mixed prompt asks for, and the skills of the free-form single prompts (held-out set only)."""
    from . import devset, heldout

    if prompt_set == "heldout":
        reworded_t, mixed_t, mixed_free = heldout.REWORDED, heldout.MIXED, heldout.MIXED_FREE
        items = {s: test[s][: lim[s]] for s in skills}
        mix_items = {s: test[s][:per_source] for s in skills}
    elif prompt_set == "dev":
        reworded_t, mixed_t, mixed_free = devset.DEV_REWORDED, devset.DEV_MIXED, devset.DEV_MIXED_FREE
        items = {s: dev_items(test[s], lim[s]) for s in skills}
        mix_items = {s: dev_items(test[s], per_source) for s in skills}
    else:
        raise ValueError(f"prompt_set must be 'heldout' or 'dev', got {prompt_set!r}")
    prompts: dict[str, list[str]] = {}
    for s in skills:
        prompts[f"evaltmpl/{s}"] = [it["prompt"] for it in items[s]]
        prompts[f"evalrew/{s}"] = [reworded_t[s][i % len(reworded_t[s])].format(text=it["raw"])
                                   for i, it in enumerate(items[s])]
    mixed = mixed_prompts(mix_items, skills, mixed_t, mixed_free)
    prompts["evalmix"] = [p for _, p in mixed]
    free = heldout.SINGLE_FREE if prompt_set == "heldout" else []
    if free:
        prompts["evalfree"] = [p for _, p in free]
    return prompts, mixed, [s for s, _ in free]


COMPARE_TEMPERATURES = (1.0, 1.5, 2.0, 3.0)


def compare_gates(data_dir: str, *, embedder: str = "minilm", small: bool = False, cache: str | None = None,
                  prompt_set: str = "heldout", ends: int = 0, variants: list[str] | None = None,
                  log: Any = print) -> dict[str, Any]:
    """Gate variants (``GATE_VARIANTS``, or those named in ``variants``) on one prompt representation, added
    skill by skill (sentiment, summary, boolq) as ``skills_add`` does, without training adapters: top-1 on
    reworded prompts and mixed-prompt weights, on the held-out set or the development set (``prompt_set``).

    Gate prompts per skill: ``nt`` of the first 2,000 training prompts (seeded sample) and ``nv`` generated ones
    (the data's instruction + ``SEED_INSTRUCTIONS``), ``nm`` composed prompts per pair; scored: test items
    reworded and in the template, the set's mixed prompts (``per_source`` items per source) and, for the
    held-out set, the free-form ones. The share of mixed prompts with both skills weighted >= 0.25 and the mean
    weight of the right skill on reworded prompts are given at each of ``COMPARE_TEMPERATURES``, with
    ``weight_ce``: the cross-entropy of the routing weights against the requested skills (mean of -log w over
    the requested skills of a prompt), averaged over the reworded and, separately, the mixed prompts, then
    over the two (the criterion the default temperature is chosen by, on the development set). ``small``
    uses fewer prompts (for the slower ``base`` embedder); ``ends`` is the embedder's end pooling.
    """
    import random

    from safetensors.torch import load_file, save_file

    from loramix.skills.gate import Gate, GateConfig, embed_prompts, embedder_spec, train_gate
    from loramix.skills.phrasings import compose, split_template, template_instruction, vary

    d = Path(data_dir)
    nt, nv, nm = (60, 120, 60) if small else (150, 300, 150)
    lim = {"sentiment": 60, "summary": 30, "boolq": 60} if small else {"sentiment": 100, "summary": 40, "boolq": 100}
    per_source = 24 if small else 48
    skills = ["sentiment", "summary", "boolq"]
    train = {s: _read_jsonl(d / f"{s}_train.jsonl")[:2000] for s in skills}
    test = {s: _read_jsonl(d / f"{s}_test.jsonl") for s in skills}
    instr, contents = {}, {}
    for s in skills:
        pre, suf, cont = split_template([r["prompt"] for r in train[s]])
        instr[s] = [template_instruction(pre, suf)] + SEED_INSTRUCTIONS[s]
        contents[s] = cont
    rng = random.Random(0)
    prompts: dict[str, list[str]] = {}
    for s in skills:
        prompts[f"tmpl/{s}"] = rng.sample([r["prompt"] for r in train[s]], min(nt, len(train[s])))
        prompts[f"var/{s}"] = vary(instr[s], contents[s], nv, seed=1)
    for a, b in [("sentiment", "summary"), ("sentiment", "boolq"), ("summary", "boolq")]:
        prompts[f"mix/{a}+{b}"] = compose(instr[a], instr[b], contents[a][:300] + contents[b][:300], nm, seed=2)
    evalp, eval_mixed, free_skills = _eval_prompts(test, skills, prompt_set, lim, per_source)
    prompts.update(evalp)

    emb: dict[str, torch.Tensor] = load_file(cache) if cache and Path(cache).is_file() else {}
    spec = embedder_spec(embedder, ends=ends)
    base = tok = None
    keys = {k: EmbeddingCache.key(spec, "\0".join(v)) for k, v in prompts.items()}
    for k, v in prompts.items():
        if keys[k] in emb:
            continue
        if spec["kind"] == "base" and base is None:
            from loramix.models import load_base_model

            base, tok = load_base_model(None, device="cpu")
        emb[keys[k]] = embed_prompts(spec, v, base=base, tokenizer=tok)
        log(f"embedded {k} ({len(v)})")
        if cache:
            save_file(emb, cache)
    emb = {k: emb[keys[k]] for k in prompts}

    def run(cfg: GateConfig, varied: bool) -> dict[str, Any]:
        gate = Gate(emb["evalmix"].shape[1], [], cfg)
        out = {}
        mixed = [(emb[k], tuple(k[4:].split("+"))) for k in sorted(emb) if k.startswith("mix/")] if varied else []
        for n, s in enumerate(skills, 1):
            gate.add_skill(s)
            single = {x: torch.cat([emb[f"tmpl/{x}"]] + ([emb[f"var/{x}"]] if varied else [])) for x in gate.skills}
            train_gate(gate, single, s, mixed)
            if n < 2:
                continue
            r: dict[str, Any] = {}
            for x in gate.skills:
                for v in ("evaltmpl", "evalrew"):
                    w = gate.weights(emb[f"{v}/{x}"])
                    r[f"{v}/{x}"] = round(float((w.argmax(-1) == gate.skills.index(x)).float().mean()), 3)
            if free_skills:
                w = gate.weights(emb["evalfree"])
                ok = [gate.skills[int(w[i].argmax())] == s_ for i, s_ in enumerate(free_skills) if s_ in gate.skills]
                r["free"] = round(sum(ok) / len(ok), 3)
            rows = [(i, asked) for i, (asked, _) in enumerate(eval_mixed) if all(a in gate.skills for a in asked)]
            r["mixed_n"] = len(rows)
            for t in COMPARE_TEMPERATURES:
                w = gate.weights(emb["evalmix"], temperature=t)
                both = [all(float(w[i, gate.skills.index(a)]) >= 0.25 for a in asked) for i, asked in rows]
                r[f"mixed_both_ge_0.25@T{t:g}"] = round(sum(both) / len(both), 3)
                own = torch.cat([gate.weights(emb[f"evalrew/{x}"], temperature=t)[:, gate.skills.index(x)]
                                 for x in gate.skills])  # (n reworded,) weight of the requested skill
                r[f"reworded_mean_own_weight@T{t:g}"] = round(float(own.mean()), 3)
                mixed_ce = torch.stack([torch.stack([w[i, gate.skills.index(a)] for a in asked]).clamp(min=1e-9)
                                        .log().mean() for i, asked in rows])  # (n mixed,)
                r[f"weight_ce@T{t:g}"] = round(-float(mixed_ce.mean() + own.clamp(min=1e-9).log().mean()) / 2, 3)
            out[f"{n}_skills"] = r
        return out

    results = {"embedder": spec, "small": small, "prompt_set": prompt_set,
               "sizes": {"data": nt, "generated": nv, "composed": nm, "scored": lim, "mixed_per_source": per_source},
               "variants": {}}
    for name, options, varied in GATE_VARIANTS:
        if variants is not None and name not in variants:
            continue
        results["variants"][name] = run(GateConfig(**options), varied)
        log(json.dumps({name: results["variants"][name]}))
    return results


def _markdown(results: dict[str, Any]) -> str:
    lines = ["| prompts | skill | n | gate accuracy | mean weight of the right skill | routed to |",
             "|---|---|---|---|---|---|"]
    for variant in ("template", "reworded"):
        for name, r in results["routing"].get(variant, {}).items():
            routed = ", ".join(f"{m} {c}" for m, c in r["routed_to"].items())
            lines.append(f"| {variant} | {name} | {r['n']} | {100 * r['accuracy']:.1f}% | "
                         f"{r['mean_weight_own']:.3f} | {routed} |")
    if "single_free" in results["routing"]:
        r = results["routing"]["single_free"]
        lines.append(f"| single, free-form | all | {r['n']} | {100 * r['accuracy']:.1f}% | | |")
    if "mixed" in results["routing"]:
        r = results["routing"]["mixed"]
        lines += ["", "| mixed prompts | n | both requested skills weighted >= 0.25 |", "|---|---|---|",
                  f"| all | {r['n']} | {100 * r['both_weighted_share']:.1f}% |"]
        lines += [f"| {k} | {v['n']} | {100 * v['both_weighted_share']:.1f}% |" for k, v in r["by_pair"].items()]
    if results["scores"]:
        lines += ["", "| skill | metric | n | base | own adapter | blend top-1 | blend soft |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in results["scores"].items():
            lines.append(f"| {name} | {r['metric']} | {r['n']} | {r['base']} | {r['own_adapter']} | "
                         f"{r['blend_top1']} | {r['blend_soft']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.skills_demo.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the demo's train/test JSONL files")
    p.add_argument("out_dir")
    p.add_argument("--data-dir", default=None, help="default: $LORAMIX_DATA_DIR")
    i = sub.add_parser("instructions", help="print a skill's seed phrasings as JSON (for skills add --instructions)")
    i.add_argument("skill", choices=sorted(SEED_INSTRUCTIONS))
    c = sub.add_parser("compare-gates", help="gate variants on one representation (no adapters needed)")
    c.add_argument("data", help="the directory written by `prepare`")
    c.add_argument("--embedder", default="minilm", help="minilm, base or a sentence-encoder directory")
    c.add_argument("--small", action="store_true", help="fewer prompts (for the slower base embedder)")
    c.add_argument("--prompt-set", choices=("heldout", "dev"), default="heldout",
                   help="score on the held-out set or on the development set (bench.skills_demo.devset)")
    c.add_argument("--ends", type=int, default=0, help="embedder end pooling: tokens at each end (0 = mean only)")
    c.add_argument("--variants", default=None, help="GATE_VARIANTS names separated by ';' (default: all)")
    c.add_argument("--cache", default=None, help="a safetensors file keeping the embeddings")
    c.add_argument("--json", required=True)
    e = sub.add_parser("evaluate", help="held-out routing accuracy and per-skill scores of a library")
    e.add_argument("library")
    e.add_argument("data", help="the directory written by `prepare`")
    e.add_argument("--json", required=True, help="write the results here")
    e.add_argument("--route-limit", default="sentiment=200,boolq=200,summary=60",
                   help="held-out prompts routed per skill (and per prompt variant)")
    e.add_argument("--cache", default=None, help="a safetensors file caching the prompt embeddings")
    e.add_argument("--score-limit", default="sentiment=120,boolq=120,summary=40",
                   help="items scored per skill, e.g. sentiment=200,summary=50")
    e.add_argument("--routing-only", action="store_true")
    e.add_argument("--gate-temperature", type=float, default=None, help="default: the library's")
    e.add_argument("--mixed-per-source", type=int, default=24,
                   help="test items per source skill filled into the held-out mixed instructions")
    e.add_argument("--score-prompts", choices=("template", "reworded"), default="reworded",
                   help="which prompts of the held-out items the skill scores use")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.out_dir, args.data_dir), indent=2))
        return
    if args.cmd == "instructions":
        print(json.dumps(SEED_INSTRUCTIONS[args.skill]))
        return
    if args.cmd == "compare-gates":
        res = compare_gates(args.data, embedder=args.embedder, small=args.small, cache=args.cache,
                            prompt_set=args.prompt_set, ends=args.ends,
                            variants=args.variants.split(";") if args.variants else None,
                            log=lambda s: print(s, flush=True))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        return
    def per_skill(text: str) -> dict[str, int]:
        return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}

    t = time.perf_counter()
    res = evaluate(args.library, args.data, route_limit=per_skill(args.route_limit),
                   score_limit=per_skill(args.score_limit), cache=args.cache,
                   routing_only=args.routing_only, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   mixed_per_source=args.mixed_per_source, score_prompts=args.score_prompts,
                   gate_temperature=args.gate_temperature,
                   log=lambda s: print(s, flush=True))
    res["seconds"] = round(time.perf_counter() - t, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(_markdown(res))
    print(f"total {res['seconds']}s")


if __name__ == "__main__":
    main()
