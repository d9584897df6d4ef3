"""The completions server over real HTTP on loopback: answers, streaming, errors, batching under load."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from tokenizers import pre_tokenizers, trainers

from refinery.model.generate import generate
from refinery.model.gpt import GPT, config_from_preset
from refinery.model.quantize import quantize_int8
from refinery.serving.server import CompletionRequest, ServerConfig, _held_back, create_app, serving
from refinery.tasks.tokenizer import EOT, new_byte_level_bpe

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "for i in range(10):\n    print(i * i)\n"
) * 20


@pytest.fixture(scope="module")
def tokenizer():
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.encode_special_tokens = True
    return tok


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(config_from_preset("test", tokenizer.get_vocab_size(), seq_len=64)).eval()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    cfg = ServerConfig(model_name="tiny", max_tokens_limit=32, max_batch_size=8, batch_window_ms=20)
    with serving(create_app(model, tokenizer, cfg)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def expected(model, tokenizer, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) the server must give for a greedy request."""
    eot = tokenizer.token_to_id(EOT)
    out = generate(model, [tokenizer.encode(prompt).ids or [eot]], max_tokens, temperature=0, eos_id=eot)[0]
    reason = "length" if len(out) == max_tokens else "stop"
    return tokenizer.decode(out, skip_special_tokens=True), reason, len(out)


def sse(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_and_models(server):
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["context"] == 64
    assert health["int8"] is False
    assert server.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_plain_completion_has_the_openai_shape_and_the_greedy_answer(server, model, tokenizer):
    prompt = "def add(a, b):"
    r = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    text, reason, n = expected(model, tokenizer, prompt, 12)
    assert body["choices"] == [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]
    prompt_tokens = len(tokenizer.encode(prompt).ids)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def test_streaming_sends_the_same_text_as_server_sent_events(server, model, tokenizer):
    prompt = "class Point:"
    with server.stream("POST", "/v1/completions",
                       json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2 and all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text, reason, _ = expected(model, tokenizer, prompt, 16)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_sequences_cut_the_text_plain_and_streamed(server, model, tokenizer):
    prompt = "for i in"
    full, _, _ = expected(model, tokenizer, prompt, 24)
    assert len(full) > 6
    stop = full[3:6]  # a piece of what the model will say
    cut = full[: full.find(stop)]
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop, "never-said-xyz"]}
    plain = server.post("/v1/completions", json=body).json()
    assert plain["choices"][0]["text"] == cut and plain["choices"][0]["finish_reason"] == "stop"
    with server.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = sse(r)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_list_of_prompts_gives_one_choice_each(server, model, tokenizer):
    prompts = ["The quick", "print(", ""]
    body = server.post("/v1/completions", json={"prompt": prompts, "max_tokens": 6, "temperature": 0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        assert choice["text"] == expected(model, tokenizer, prompt, 6)[0]


def test_sampling_is_reproducible_with_a_seed(server):
    body = {"prompt": "The", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert server.post("/v1/completions", json=body).json()["choices"][0]["text"] == first


@pytest.mark.parametrize(
    ("content", "status", "param", "message"),
    [
        (b'{"prompt": "hi", "max_tokens": ', 400, None, "not valid JSON"),
        (b'["hi"]', 400, None, "JSON object"),
        (json.dumps({"prompt": "hi", "max_tokens": -3}).encode(), 400, "max_tokens", "greater than or equal to 1"),
        (json.dumps({"prompt": "hi", "max_tokens": 33}).encode(), 400, "max_tokens", "at most 32"),
        (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "temperature", "temperature"),
        (json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400, "top_p", "top_p"),
        (json.dumps({"prompt": "hi", "best_of": 3}).encode(), 400, "best_of", "Extra inputs are not permitted"),
        (json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop", "up to 4"),
        (json.dumps({"prompt": []}).encode(), 400, "prompt", "non-empty list"),
        (json.dumps({"prompt": "x" * (1 << 20)}).encode(), 413, None, "limit"),
        (json.dumps({"prompt": "word " * 200, "max_tokens": 4}).encode(), 400, "prompt", "tokens; the limit is 63"),
        (json.dumps({"prompt": "x" * 40, "max_tokens": 32}).encode(), 400, "max_tokens", "exceeds the model's context"),
        (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), 404, "model", "not served here"),
    ],
)
def test_malformed_requests_get_clear_4xx_errors(server, content, status, param, message):
    r = server.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"]


def test_concurrent_requests_are_batched_and_all_answered(server, model, tokenizer):
    """A bounded load test: 48 greedy requests from 16 threads; every answer equals the unbatched one."""
    prompts = [f"{word} {i}" for i, word in enumerate(["def", "class", "The", "for", "print", "return"] * 8)]
    want = {p: expected(model, tokenizer, p, 8)[0] for p in set(prompts)}
    before = server.get("/health").json()["batches"]

    def one(prompt: str) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        r = server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
        return time.perf_counter() - t0, r.status_code, r.json()["choices"][0]["text"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    assert [status for _, status, _ in results] == [200] * len(prompts)
    assert [text for _, _, text in results] == [want[p] for p in prompts]
    health = server.get("/health").json()
    assert health["largest_batch"] > 1  # concurrent requests shared a forward pass
    assert health["batches"] - before < len(prompts)
    assert health["pending"] == 0
    latencies = sorted(t for t, _, _ in results)
    p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\nload test: {len(prompts)} requests, {len(prompts) / wall:.1f} requests/s, "
          f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {health['batches'] - before} batches")  # fmt: skip


def test_int8_model_serves_and_reports_itself(model, tokenizer):
    import copy

    q = quantize_int8(copy.deepcopy(model))
    with serving(create_app(q, tokenizer, ServerConfig())) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json()["int8"] is True
        r = client.post("/v1/completions", json={"prompt": "def", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert client.get("/v1/completions").status_code == 405
        assert client.get("/nowhere").status_code == 404


def test_request_model_and_stop_hold_back():
    assert CompletionRequest(prompt="x", stop="END").stop == ["END"]
    assert CompletionRequest(prompt="x").stop == []
    assert _held_back("hello EN", ["END"]) == 2
    assert _held_back("hello E", ["END", "Ex"]) == 1
    assert _held_back("hello", ["END"]) == 0
    with pytest.raises(ValueError, match="extra"):
        ServerConfig(max_batch=3)


def test_model_uris_resolve_through_the_tracking_uri_from_the_environment(model, tokenizer, tmp_path, monkeypatch):
    """A `runs:/` model tracked in a store named only by $MLFLOW_TRACKING_URI loads, like every other command's."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from refinery.model.checkpoint import save_checkpoint
    from refinery.serving.loading import load_for_serving, resolve_model

    checkpoint = save_checkpoint(tmp_path / "checkpoint", model)
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("served", artifact_location=(tmp_path / "shared" / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(checkpoint), "model")
    client.set_terminated(run_id)

    root = tmp_path / "root"  # a run root whose own store has never seen this run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(MlflowException):
        resolve_model(f"runs:/{run_id}/model", root)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    found, tok_file = resolve_model(f"runs:/{run_id}/model", root)
    assert (found / "model.safetensors").is_file() and tok_file.name == "tokenizer.json"
    served, served_tok = load_for_serving(f"runs:/{run_id}/model", root)
    assert served_tok.get_vocab_size() == tokenizer.get_vocab_size()
    ids = torch.tensor([tokenizer.encode("def add").ids])
    with torch.no_grad():
        torch.testing.assert_close(served(ids)[0], model(ids)[0])  # the same weights came back


def test_a_missing_checkpoint_folder_is_named(tmp_path):
    from refinery.serving.loading import resolve_model

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nowhere", tmp_path)
