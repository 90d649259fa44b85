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
