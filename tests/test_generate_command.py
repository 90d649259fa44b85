"""`moe-runtime generate` / `forward --generate` in process: the JSON contract, the tokens of the engine, streamed
text, bad input named. (The cluster path of the same engine: tests/runtime/test_generate_cluster.py.)"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moe_runtime.cli import app
from moe_runtime.config import load_config
from moe_runtime.generate_command import local_engine, per_prompt_params
from moe_runtime.generation.byte_tokenizer import ByteTokenizer
from moe_runtime.generation.sampling import SamplingParams
from moe_runtime.model.transformer import build_model

runner = CliRunner()
CFG = load_config("cluster/local.yaml")


def _engine():
    return local_engine(build_model(CFG.model, CFG.train.seed).eval(), CFG.model)


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_generate_json_equals_the_engine_greedy_and_seeded():
    out = _json(runner.invoke(app, ["generate", "--prompt", "def f(", "--prompt", "import", "--token-ids", "256,97",
                                    "--max-new-tokens", "7", "--temperature", "0.9", "--top-k", "40", "--top-p",
                                    "0.9", "--seed", "5", "--in-process", "--json"]))
    tok = ByteTokenizer()
    params = per_prompt_params(3, 7, 0.9, 40, 0.9, 5)
    want = _engine().generate([tok.encode("def f("), tok.encode("import"), [256, 97]], params)
    assert out["new_token_ids"] == [c.new_token_ids for c in want]
    assert out["text"] == [c.text for c in want]
    assert out["prompt_token_ids"][2] == [256, 97] and len(out["finish_reason"]) == 3
    greedy = _json(runner.invoke(app, ["generate", "--token-ids", "256,100,101", "--max-new-tokens", "8",
                                       "--temperature", "0", "--in-process", "--json"]))
    assert greedy["new_token_ids"] == [_engine().generate([[256, 100, 101]],
                                                          SamplingParams(8, temperature=0))[0].new_token_ids]


def test_generate_streams_text_to_stdout_without_json():
    r = runner.invoke(app, ["generate", "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0",
                            "--in-process"])
    assert r.exit_code == 0, r.output
    want = _engine().generate([ByteTokenizer().encode("ab")], SamplingParams(6, temperature=0))[0]
    assert r.stdout.rstrip("\n") == want.text


def test_forward_generate_delegates_to_the_engine():
    out = _json(runner.invoke(app, ["forward", "--text", "def", "--generate", "5", "--in-process", "--json"]))
    want = _engine().generate([ByteTokenizer().encode("def")], SamplingParams(5, temperature=0))[0]
    assert out["continuation_ids"] == want.new_token_ids and out["continuation"] == want.text


def test_prompts_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\n")
    out = _json(runner.invoke(app, ["generate", "--prompts-file", str(f), "--max-new-tokens", "2",
                                    "--temperature", "0", "--in-process", "--json"]))
    assert len(out["new_token_ids"]) == 2


def test_bad_inputs_are_named():
    cases = [
        (["--token-ids", "1,x"], "--token-ids"),
        (["--token-ids", "1,99999"], "vocabulary"),
        (["--prompt", "a", "--temperature", "-1"], "temperature"),
        (["--prompt", "a", "--top-p", "0"], "top_p"),
        ([], "no prompt"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, ["generate", *args, "--max-new-tokens", "3", "--in-process"])
        assert r.exit_code == 2 and needle in r.output, (args, r.output)
    r = runner.invoke(app, ["generate", "--prompt", "a", "--max-new-tokens", "0", "--in-process"])
    assert r.exit_code == 2 and "max_new_tokens" in r.output


def test_json_says_degraded_empty_in_process():
    """`degraded` ([layer, expert] pairs computed without; mask mode on a cluster: tests/runtime/
    test_expert_mask_serving.py) is [] in process, for generate and forward (with and without a continuation)."""
    gen = _json(runner.invoke(app, ["generate", "--token-ids", "256,97", "--max-new-tokens", "2", "--temperature",
                                    "0", "--in-process", "--json"]))
    assert gen["degraded"] == [] and len(gen["new_token_ids"][0]) == 2
    for extra in ([], ["--generate", "2"]):
        fwd = _json(runner.invoke(app, ["forward", "--token-ids", "5,17,42", "--in-process", "--json", *extra]))
        assert fwd["degraded"] == [] and len(fwd["last_logits"]) == CFG.model.vocab_size


def test_degraded_through_the_daemon_handle():
    """With a cluster daemon up the CLI holds a session.RemoteCluster: its last_degraded asks the daemon, whose
    handler calls Cluster.degraded_pairs (here on a stand-in holding only last_degraded), over the real socket."""
    import secrets
    import threading
    from multiprocessing.connection import Listener
    from types import SimpleNamespace

    from moe_runtime.generate_command import degraded_of
    from moe_runtime.runtime import session
    from moe_runtime.runtime.cluster import Cluster

    key = secrets.token_bytes(16)
    daemon = SimpleNamespace(last_degraded=[[1, 4], [0, 6]])
    daemon.degraded_pairs = lambda: Cluster.degraded_pairs(daemon)
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        def serve_one() -> None:
            with listener.accept() as conn:
                session._handle(conn, daemon)

        t = threading.Thread(target=serve_one, daemon=True)
        t.start()
        handle = session.RemoteCluster({"port": listener.address[1], "key": key.hex(), "pid": 0})
        assert degraded_of(handle) == [[1, 4], [0, 6]]
        t.join(10)
    assert degraded_of(None) == [] and degraded_of(object()) == []
