"""Autointerp: the OpenAI-compatible client against a loopback stub server, contexts and controls by construction,
and (slow) a planted digit feature whose explanation must beat its shuffled control with the real scorer."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from mechscope.analysis.metrics import auroc
from mechscope.core.errors import InputError
from mechscope.sae.autointerp import EndpointExplainer, explain_and_score, feature_contexts


class _Stub(BaseHTTPRequestHandler):
    requests: list = []
    status = 200

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.requests.append((self.path, dict(self.headers), body))
        content = f"digits and numbers\nsecond line {len(_Stub.requests)}"
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        self.send_response(_Stub.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(reply if _Stub.status == 200 else {"error": "boom"}).encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def stub_server():
    srv = HTTPServer(("127.0.0.1", 0), _Stub)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    _Stub.requests, _Stub.status = [], 200
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_endpoint_explainer_speaks_openai_chat_completions(stub_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekret")
    ex = EndpointExplainer(stub_server, model="lab-model", api_key_env="MY_KEY")
    assert ex.explain(["what do <<these>> share?", "and these?"]) == ["digits and numbers"] * 2
    path, headers, body = _Stub.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "lab-model" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": "what do <<these>> share?"}]
    assert headers["Authorization"] == "Bearer sekret"


def test_endpoint_errors_name_the_server(stub_server):
    _Stub.status = 500
    with pytest.raises(InputError, match="HTTP 500"):
        EndpointExplainer(stub_server).explain(["x"])
    with pytest.raises(InputError, match="cannot reach"):
        EndpointExplainer("http://127.0.0.1:9/v1", timeout=2).explain(["x"])


class _Tok:
    def decode(self, ids):
        return f" t{ids[0]}"


def test_contexts_mark_firing_tokens_and_hold_out_scoring_examples():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (40, 24), generator=g)
    act = (tokens == 7).float() * torch.rand(tokens.shape, generator=g)
    c = feature_contexts(_Tok(), tokens, act, n_shown=6, n_score=4, seed=0)
    assert len(c.shown) == 6 and all("<< t7>>" in s for s in c.shown)
    assert len(c.detect_pos) == 4 and len(c.detect_neg) == 4
    assert not any(" t7" in s for s in c.detect_neg)  # never-firing contexts hold no firing token
    assert all("<< t7>>" in s for s in c.fuzz_pos) and not any("<< t7>>" in s for s in c.fuzz_neg)
    assert feature_contexts(_Tok(), tokens, torch.zeros_like(act)) is None  # never fires: nothing to score


def test_contexts_have_one_length_wherever_the_feature_fires():
    """A firing token near the start or the end of a sequence still gets a full window: the scorer must not be able
    to tell firing from silent contexts by their length (short windows near the start are silent more often)."""
    tokens = torch.arange(5, 5 + 40 * 24).remainder(50).view(40, 24)
    act = torch.zeros(tokens.shape)
    act[:, 1] = act[:, 23] = act[::3, 12] = 1.0  # the first and last usable positions, and one in the middle
    c = feature_contexts(_Tok(), tokens, act, n_shown=6, n_score=8, window=10, seed=0)
    lengths = {s.count(" t") for s in c.shown + c.detect_pos + c.detect_neg + c.fuzz_pos + c.fuzz_neg}
    assert lengths == {10}


def _text_scorer(rule):
    """A stand-in for the scorer's Yes/No log-odds: ``rule(text, explanation)`` on each detection or fuzzing prompt."""
    import re as _re

    def logodds(scorer, prompts, batch=32):
        return torch.tensor([float(rule(*_re.match(r"Text: (.*)\n(?:Does this text contain|Is the token marked "
                                                   r"<<like this>> one of) (.*)\? Answer", p).groups()))
                             for p in prompts])
    return logodds


def _has(text: str, piece: str) -> bool:
    """Whether the token ``piece`` (``t7``: not ``t75``) is in ``text``."""
    import re as _re

    return bool(_re.search(rf"(?<![\w]){piece}(?![\w])", text))


def test_calibration_cancels_a_scorer_that_reads_only_the_text(monkeypatch):
    """The artefact behind random directions beating features: a scorer whose answer depends on the text alone
    separates firing from silent contexts whatever the explanation says. The raw AUROC is then 1.0 with the right
    explanation, the shuffled one and for a random direction alike; the calibrated AUROC is 0.5. A scorer that
    reads the explanation keeps its calibrated AUROC above 0.5."""
    import mechscope.sae.autointerp as ai

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, 500, (200, 24), generator=g)
    for t in (7, 9, 11, 13):  # each marker planted 16 times: rare enough that silent windows seldom hold another
        tokens.view(-1)[torch.randperm(tokens.numel(), generator=g)[:16]] = t
    ctx = {f: feature_contexts(_Tok(), tokens, (tokens == t).float(), n_score=8, seed=i)
           for i, (f, t) in enumerate({"a": 7, "b": 9}.items())}
    rand = {"random-0": feature_contexts(_Tok(), tokens, (tokens == 11).float(), n_score=8, seed=5),
            "random-1": feature_contexts(_Tok(), tokens, (tokens == 13).float(), n_score=8, seed=6)}
    given = {"a": "t7", "b": "t9"}
    explainer = type("E", (), {"name": "stub", "explain": lambda self, ps: ["t11", "t13"]})()
    monkeypatch.setattr(ai, "yes_no_logodds", _text_scorer(lambda text, e: any(_has(text, f"t{t}") for t in (7, 9, 11, 13))))
    scorer = type("S", (), {"cfg": type("C", (), {"model_name": "stub"})})()
    res = explain_and_score(scorer, explainer, ctx, rand, explanations=given)
    raw = [*res.detection.values(), *res.shuffled_detection.values(), *res.random_detection.values()]
    assert min(raw) > 0.7 and res.detection == res.shuffled_detection  # the text alone separates them
    assert res.calibrated_detection == {"a": 0.5, "b": 0.5} and set(res.random_calibrated_detection.values()) == {0.5}
    assert "calibrated" in res.summary() and "s a feature, its controls included" in res.summary()
    monkeypatch.setattr(ai, "yes_no_logodds", _text_scorer(lambda text, e: _has(text, e)))  # reads the explanation
    res = explain_and_score(scorer, explainer, ctx, rand, explanations=given)
    assert min(res.calibrated_detection.values()) > 0.8 and min(res.random_calibrated_detection.values()) > 0.8
    assert max(res.shuffled_detection.values()) < 0.8


def test_auroc_by_construction():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1], [2]) == 0.0 and auroc([1, 2], [1, 2]) == 0.5
    with pytest.raises(InputError):
        auroc([], [1])


class _Refuse:
    name = "none"

    def explain(self, prompts):
        raise AssertionError("explanations were given: the explainer must not be called")


@pytest.mark.slow
def test_planted_digit_feature_beats_its_shuffled_control(smollm):
    """A 'feature' firing exactly on tokens with a digit, explained as 'digits', scored by the real SmolLM2: its
    detection AUROC must beat the same contexts scored with the other feature's explanation."""
    from mechscope import corpus

    toks = corpus.pack(smollm, corpus.default_corpus("test"), 64, n_seqs=200)
    tok = smollm.tokenizer
    pieces = [tok.decode([i]) for i in range(len(tok))]
    dig = torch.tensor([any(ch.isdigit() for ch in p) for p in pieces])
    cap = torch.tensor([p.strip()[:1].isupper() and p.strip().isalpha() for p in pieces])
    ctx = {"digits": feature_contexts(tok, toks, dig[toks].float(), n_score=20, seed=0),
           "capitals": feature_contexts(tok, toks, cap[toks].float(), n_score=20, seed=1)}
    res = explain_and_score(smollm, _Refuse(), ctx, explanations={"digits": "digits", "capitals": "capitalized words"})
    assert res.explanations["digits"] == "digits"
    assert res.detection["digits"] > res.shuffled_detection["digits"]
    assert "shuffled" in res.summary() and 0 <= res.fuzzing["digits"] <= 1


def test_dashboard_explain_saves_and_shows_explanations(stub_server, tmp_path, monkeypatch, capsys):
    """`sae dashboard --explain` through an endpoint: explanations.json in the SAE folder, shown on the pages, read
    back by load_sae (which the graph labels and the investigate report use)."""
    import mechscope as ms
    from mechscope.cli import main
    from mechscope.sae import SAE, SAEConfig, load_sae, save_sae
    from tiny import worded_llama

    model = worded_llama()
    sae = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=16, architecture="relu", hook_name="blocks.1.hook_resid_post"))
    path = save_sae(sae, tmp_path / "sae")
    monkeypatch.setattr(ms, "load", lambda *a, **k: model)
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n\n".join(" ".join(f"t{5 + (i * j) % 80}" for j in range(40)) for i in range(60)))
    assert main(["sae", "dashboard", str(path), "--features", "3,7", "--corpus", str(corpus_file), "--seq-len", "16",
                 "--seqs", "40", "--out", str(tmp_path / "d"), "--explain", "--explainer-url", stub_server,
                 "--random", "2"]) == 0
    out = capsys.readouterr().out
    assert "autointerp" in out and "shuffled" in out
    saved = json.loads((path / "explanations.json").read_text())
    assert saved["features"] and all(v["explanation"] == "digits and numbers" for v in saved["features"].values())
    f = next(iter(saved["features"]))
    assert "digits and numbers" in (tmp_path / "d" / f"feature_{f}.html").read_text()
    assert load_sae(path).explanations[int(f)] == "digits and numbers"
