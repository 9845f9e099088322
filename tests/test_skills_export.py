"""`loramix skills export` (PEFT LoRA adapters + gate) and the skill router / OpenAI-compatible proxy, with an
in-process fake upstream in place of vLLM."""

# no `from __future__ import annotations`: the fake upstream's FastAPI routes need real annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.tiny_lm import save_tiny_lm
from loramix import load_adapter
from loramix.cli import main as cli_main
from loramix.injection import unload
from loramix.models import load_base_model
from loramix.skills import skills_add, skills_route
from loramix.skills.export import (
    EXPORT_MANIFEST,
    SkillExportError,
    read_export,
    skills_export,
    vllm_command,
    vllm_max_lora_rank,
)
from loramix.skills.serve import ROUTE_MODEL, SkillRouter, prompt_from_messages

TRAIN = dict(device="cpu", max_steps=4, batch_size=8, learning_rate=2e-2, val_size=0, r=4, attn_r=4, seed=1,
             logging_steps=1, plots=False)
ADJ = ["great", "awful", "boring", "moving", "funny", "dull"]
NAMES = ["Anna", "Bob", "Carla", "Dev", "Emma"]
PHRASES = ["the cat sleeps", "I like tea", "we go home", "the sky is blue"]


def rows(skill: str, n: int, seed: int) -> list[dict[str, str]]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        if skill == "review":
            p = f"Movie review: the plot was {r.choice(ADJ)} and the cast {r.choice(ADJ)}. Sentiment?"
            out.append({"prompt": p, "response": r.choice(["positive", "negative"])})
        elif skill == "dialogue":
            x, y = r.sample(NAMES, 2)
            out.append({"prompt": f"Summarize the dialogue:\n{x}: hi, how was it?\n{y}: fine, thanks.",
                        "response": f"{x} and {y} talk."})
        else:
            out.append({"prompt": f"Translate to French: {r.choice(PHRASES)} {r.randint(0, 99)}",
                        "response": "le chat dort"})
    return out


def held_out(skill: str) -> list[str]:
    return [x["prompt"] for x in rows(skill, 4, seed=77)]


def build_library(d: Path, model_overrides: dict | None = None) -> dict:
    """review (plain LoRA), dialogue (MixLoRA with one expert), translate (MixLoRA, 4 experts top-2)."""
    model_dir = save_tiny_lm(d / "model", **(model_overrides or {}))
    for s in ("review", "dialogue", "translate"):
        (d / f"{s}.jsonl").write_text("\n".join(json.dumps(x) for x in rows(s, 24, seed=1)))
    root = d / "lib"
    skills_add(str(root), "review", str(d / "review.jsonl"), model=model_dir, adapter="lora", **TRAIN)
    skills_add(str(root), "dialogue", str(d / "dialogue.jsonl"), adapter="mixlora", num_experts=1, top_k=1, **TRAIN)
    skills_add(str(root), "translate", str(d / "translate.jsonl"), adapter="mixlora", num_experts=4, top_k=2,
               **TRAIN)
    return {"root": root, "model_dir": model_dir, "dir": d}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("skills_export"))


@pytest.fixture(scope="module")
def exported(lib):
    out = lib["dir"] / "export"
    result = skills_export(str(lib["root"]), str(out), skip_unsupported=True)
    return {"dir": out, "result": result}


def test_refuses_a_routed_mixlora_skill_by_default_and_writes_nothing(lib, tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(SkillExportError) as e:
        skills_export(str(lib["root"]), str(out))
    msg = str(e.value)
    assert "translate (mixlora)" in msg and "4 routed mixlora experts" in msg and "--skip-unsupported" in msg
    assert "review" not in msg.split("translate")[0]  # only the unsupported skill is named
    assert not out.exists()


def test_each_exported_adapter_loads_in_peft_with_the_loramix_adapters_logits(lib, exported):
    from peft import PeftModel

    result = exported["result"]
    assert [s["name"] for s in result["skills"]] == ["review", "dialogue"]
    assert [s["name"] for s in result["skipped"]] == ["translate"]
    base, tok = load_base_model(lib["model_dir"], device="cpu", dtype="float32")
    ids = torch.tensor([tok("Movie review: the plot was funny. Sentiment?")["input_ids"]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    for name in ("review", "dialogue"):
        adapter = exported["dir"] / "adapters" / name
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] == 4 and not cfg["use_rslora"]
        keys = load_file(str(adapter / "adapter_model.safetensors"))
        assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                   for k in keys)
        assert any(".mlp.up_proj." in k for k in keys) and any(".self_attn.q_proj." in k for k in keys)
        with torch.no_grad():
            load_adapter(base, lib["root"] / "skills" / name / "adapter")
            want = base(input_ids=ids).logits
            unload(base)
            peft_model = PeftModel.from_pretrained(base, str(adapter))
            got = peft_model(input_ids=ids).logits
            base = peft_model.unload()
        assert (want - plain).abs().max() > 1e-3  # the adapter changes the model
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_manifest_router_files_and_vllm_command(lib, exported):
    out = exported["dir"]
    manifest = read_export(out)
    assert (out / EXPORT_MANIFEST).is_file() and manifest["max_lora_rank"] == 8
    assert manifest["base"]["path"] == str(Path(lib["model_dir"]).resolve())
    assert manifest["not_exported"] == ["translate"]
    assert (out / "router" / "manifest.json").is_file()
    assert any((out / "router" / "gate").glob("gate-v*.safetensors"))
    cmd = vllm_command(out)
    assert cmd.startswith(f"vllm serve {manifest['base']['path']} --enable-lora --max-lora-rank 8 --max-loras 2")
    assert f"review={out.resolve() / 'adapters' / 'review'}" in cmd and "translate=" not in cmd
    assert [vllm_max_lora_rank(r) for r in (1, 4, 16, 17, 300)] == [1, 8, 16, 32, 320]


def test_refuses_a_non_empty_output_and_a_bad_check(lib, exported, tmp_path, monkeypatch):
    with pytest.raises(SkillExportError, match="not empty.*--overwrite"):
        skills_export(str(lib["root"]), str(exported["dir"]), skills=["review"])
    import loramix.skills.export as ex

    real = ex.peft_tensors

    def corrupt(tensors, config):
        cfg, out = real(tensors, config)
        key = next(k for k in out if k.endswith("lora_B.weight"))
        out[key] = out[key] + 0.5
        return cfg, out

    monkeypatch.setattr(ex, "peft_tensors", corrupt)
    with pytest.raises(SkillExportError, match="skill 'review'.*differ"):
        skills_export(str(lib["root"]), str(tmp_path / "bad"), skills=["review"])
    assert not (tmp_path / "bad").exists()


def test_router_chooses_what_skills_route_chooses(lib, exported):
    router = SkillRouter(exported["dir"])
    prompts = held_out("review") + held_out("dialogue") + held_out("translate")
    routes = router.route(prompts)
    want = skills_route(str(lib["root"]), prompts, device="cpu")["routes"]
    assert [r.skill for r in routes] == [w["top"] for w in want]
    assert [r.weights for r in routes] == [w["weights"] for w in want]
    assert {r.skill for r in routes} == {"review", "dialogue", "translate"}  # the gate separates the skills
    for r in routes:  # a skill that is not exported goes to the base model
        assert r.model == (None if r.skill == "translate" else r.skill)


def test_route_headers():
    from loramix.skills.serve import Route

    same = Route("a", "a", {"a": 0.75, "b": 0.25}, True, "", {"a": 0.75, "b": 0.25}).headers()
    assert json.loads(same["X-Loramix-Weights"]) == {"a": 0.75, "b": 0.25} and "X-Loramix-Scores" not in same
    multi = Route("a", None, {"a": 0.6, "b": 0.4}, False, "", {"a": 0.9, "b": 0.6}).headers()
    assert json.loads(multi["X-Loramix-Scores"]) == {"a": 0.9, "b": 0.6} and multi["X-Loramix-Confident"] == "false"


def test_prompt_from_messages():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "image_url"}]},
            {"role": "user", "content": "b"}]
    assert prompt_from_messages(msgs) == "a\nb"
    assert prompt_from_messages(msgs[:2]) == "first"
    from loramix.skills.library import SkillLibraryError

    for bad in ([], [{"role": "system", "content": "x"}], [{"content": "x"}], "hi"):
        with pytest.raises(SkillLibraryError):
            prompt_from_messages(bad)


# --------------------------------------------------------------------------------------------------
# the proxy against an in-process fake upstream
# --------------------------------------------------------------------------------------------------
def fake_upstream(base_id: str, skills: list[str], seen: list[dict]):
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": base_id, "parent": None},
                                           *({"id": s, "parent": base_id} for s in skills)]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("authorization")})
        if body.get("stream"):
            async def events():
                yield f"data: {json.dumps({'model': body['model']})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        message = {"role": "assistant", "content": f"[{body['model']}]"}
        return {"model": body["model"], "choices": [{"message": message}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append({"body": body, "auth": request.headers.get("authorization")})
        return {"model": body["model"], "choices": [{"text": f"[{body['model']}]"}]}

    return app


def run_proxy(router, requests, *, upstream_app=None, **options):
    """Send ``requests`` [(method, path, json)] to the proxy; returns the responses and what upstream saw."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from loramix.skills.serve import create_app

    seen: list[dict] = []
    upstream_app = upstream_app or fake_upstream("base-model", list(router.served), seen)

    async def go():
        upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream_app), base_url="http://up")
        app = create_app(router, "http://up", client=upstream, **options)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
            out = []
            for method, path, body in requests:
                if method == "GET":
                    out.append(await c.get(path))
                elif isinstance(body, bytes):
                    out.append(await c.post(path, content=body, headers={"Content-Type": "application/json"}))
                else:
                    out.append(await c.post(path, json=body, headers={"Authorization": "Bearer from-client"}
                                            if body.get("user") == "auth" else {}))
        await upstream.aclose()
        return out

    return asyncio.run(go()), seen


def chat(prompt: str, **extra) -> tuple[str, str, dict]:
    return ("POST", "/v1/chat/completions", {"model": ROUTE_MODEL, "messages": [{"role": "user", "content": prompt}],
                                             "max_tokens": 4, **extra})


def prompt_per_skill(router) -> dict[str, str]:
    """A held-out prompt that the gate gives to each skill (the tiny gate is not asked to be perfect here)."""
    prompts = held_out("review") + held_out("dialogue") + held_out("translate")
    return {r.skill: p for p, r in reversed(list(zip(prompts, router.route(prompts), strict=True)))}


def test_proxy_routes_each_request_to_the_chosen_adapter(lib, exported):
    router = SkillRouter(exported["dir"])
    chosen = prompt_per_skill(router)
    review, dialogue, translate = chosen["review"], chosen["dialogue"], chosen["translate"]
    reqs = [chat(review), chat(dialogue), chat(translate), chat(review, stream=True),
            ("POST", "/v1/completions", {"prompt": dialogue, "max_tokens": 4}),
            ("POST", "/v1/chat/completions", {"model": "review", "messages": [{"role": "user", "content": dialogue}]}),
            ("GET", "/v1/models", None)]
    resps, seen = run_proxy(router, reqs)
    assert [r.status_code for r in resps] == [200] * len(reqs)
    sent = [s["body"]["model"] for s in seen]
    assert sent == ["review", "dialogue", "base-model", "review", "dialogue", "review"]
    assert resps[0].json()["choices"][0]["message"]["content"] == "[review]"
    assert resps[0].headers["x-loramix-skill"] == "review" and resps[0].headers["x-loramix-model"] == "review"
    weights = json.loads(resps[1].headers["x-loramix-weights"])
    assert set(weights) == {"review", "dialogue", "translate"} and max(weights, key=weights.get) == "dialogue"
    assert resps[2].headers["x-loramix-skill"] == "translate" and resps[2].headers["x-loramix-model"] == "base-model"
    assert "data: [DONE]" in resps[3].text and '"model": "review"' in resps[3].text
    assert resps[3].headers["x-loramix-skill"] == "review"
    assert "x-loramix-skill" not in resps[5].headers  # a named model is forwarded as it is
    assert seen[5]["body"]["messages"][0]["content"] == dialogue and seen[0]["body"]["max_tokens"] == 4
    assert [m["id"] for m in resps[6].json()["data"]] == ["auto", "review", "dialogue"]


def test_proxy_threshold_fallback_to_base_and_auth(lib, exported):
    router = SkillRouter(exported["dir"], threshold=1.0, fallback="base")  # never confident
    resps, seen = run_proxy(router, [chat(held_out("review")[0], user="auth")], base_name="named-base",
                            api_key="server-key")
    assert resps[0].status_code == 200 and seen[0]["body"]["model"] == "named-base"
    assert resps[0].headers["x-loramix-skill"] == "<base>" and resps[0].headers["x-loramix-confident"] == "false"
    assert seen[0]["auth"] == "Bearer from-client"
    _, seen = run_proxy(router, [chat(held_out("review")[0])], base_name="b", api_key="server-key")
    assert seen[0]["auth"] == "Bearer server-key"


def test_proxy_errors(lib, exported):
    router = SkillRouter(exported["dir"])
    bad = [("POST", "/v1/chat/completions", b"{not json"),
           ("POST", "/v1/chat/completions", {"model": "auto", "messages": [{"role": "system", "content": "x"}]}),
           ("POST", "/v1/completions", {"prompt": ["a", "b"]})]
    resps, seen = run_proxy(router, bad)
    assert [r.status_code for r in resps] == [400, 400, 400] and not seen
    assert "no user text" in resps[1].json()["error"]["message"]
    assert "one prompt per request" in resps[2].json()["error"]["message"]

    from fastapi import FastAPI

    empty = FastAPI()  # an upstream that lists no base model and has no completion routes
    chosen = prompt_per_skill(router)
    resps, _ = run_proxy(router, [chat(chosen["translate"]), chat(chosen["review"])], upstream_app=empty)
    assert resps[0].status_code == 502 and "/v1/models" in resps[0].json()["error"]["message"]
    assert resps[1].status_code == 404  # the upstream's own answer comes back


def test_serve_extra_missing_is_named(monkeypatch):
    import importlib.util

    from loramix.skills import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(ImportError, match=r"fastapi.*loramix\[serve\]"):
        serve.create_app(object(), "http://x")


def test_cli_skills_export(lib, tmp_path, capsys):
    out = tmp_path / "cli_export"
    assert cli_main(["skills", "export", "--library-dir", str(lib["root"]), "--output-dir", str(out),
                     "--skills", "[review]"]) == 0
    text = capsys.readouterr().out
    assert "review: adapters/review" in text and "--lora-modules review=" in text and "skills serve" in text
    assert [s["name"] for s in read_export(out)["skills"]] == ["review"]
    assert cli_main(["skills", "export", "--library-dir", str(lib["root"]), "--output-dir", str(tmp_path / "x")]) == 2
    assert "--skip-unsupported" in capsys.readouterr().err
