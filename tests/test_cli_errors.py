"""Bad input to the CLI: one clear message naming the flag or field, the value and what was expected; no
traceback, no raw pydantic text. Runs the commands in-process (typer's CliRunner): nothing starts a cluster."""

from __future__ import annotations

import logging
import uuid

import pytest
from typer.testing import CliRunner

from moe_runtime.cli import app

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.stderr and result.exception is None or isinstance(result.exception, SystemExit)
    return result


def test_flops_unknown_preset():
    r = run("flops", "--preset", "nope")
    assert r.exit_code == 2
    assert "--preset: preset = 'nope': expected one of ['small', 'tiny', 'yuan-m32']" in r.stderr
    assert "pydantic.dev" not in r.stderr


@pytest.mark.parametrize("seq_len", ["-5", "0", "100000"])
def test_flops_seq_len_out_of_range(seq_len):
    r = run("flops", "--preset", "tiny", "--seq-len", seq_len)
    assert r.exit_code == 2
    assert f"--seq-len = {seq_len}: expected 1..128 (model.max_seq_len)" in r.stderr


def test_forward_top_and_generate(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny}\n")
    r = run("forward", "--config", str(cfg), "--in-process", "--text", "hi", "--top", "1000")
    assert r.exit_code == 2 and "--top = 1000: expected 1..264" in r.stderr
    r = run("forward", "--config", str(cfg), "--in-process", "--text", "hi", "--generate", "-1")
    assert r.exit_code == 2 and "--generate = -1: expected a number of new tokens >= 0" in r.stderr


def test_yaml_syntax_error_names_the_file(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  preset: [tiny\n")
    r = run("config", "show", "--config", str(cfg))
    assert r.exit_code == 2
    assert f'{cfg}: not valid YAML' in r.stderr and f'in "{cfg}", line 2' in r.stderr
    assert "<unicode string>" not in r.stderr


def test_unknown_keys_suggest_the_nearest(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model: {preset: tiny, hiden_size: 64}\ntrian: {steps: 3}\ncluster: {zzz: 1}\n")
    r = run("config", "show", "--config", str(cfg))
    assert r.exit_code == 2
    assert "model.hiden_size = 64: unknown key; did you mean 'hidden_size'?" in r.stderr
    assert "trian = {'steps': 3}: unknown key; did you mean 'train'?" in r.stderr
    assert "cluster.zzz = 1: unknown key; valid keys: ray_address," in r.stderr


def test_empty_config_says_so(tmp_path, caplog):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    with caplog.at_level(logging.WARNING):
        r = run("config", "show", "--config", str(cfg))
    assert r.exit_code == 0 and "preset: tiny" in r.stdout  # the defaults, shown
    assert f"config file {cfg} is empty: every setting takes its default" in caplog.text


def test_up_with_more_cpus_than_the_machine_has(tmp_path):
    cfg = tmp_path / "cpus.yaml"
    cfg.write_text("model: {preset: tiny}\ncluster: {num_gpus: 2, expert_actors: 2, router_workers: 1, "
                   "cpus_per_actor: 4096}\n")
    r = run("--name", f"cpus-{uuid.uuid4().hex[:6]}", "up", "--config", str(cfg))
    assert r.exit_code == 1
    assert "cluster.cpus_per_actor = 4096 x 3 actors needs 12288 CPUs" in r.stderr
    assert "use cpus_per_actor: 0 on small machines" in r.stderr and "Traceback" not in r.stderr


def test_forward_without_a_cluster_says_it_starts_one_untrained(capsys):
    from moe_runtime.config import RuntimeConfig
    from moe_runtime.ops_cli import warn_fresh_cluster
    from moe_runtime.runtime.session import set_name

    set_name(f"none-{uuid.uuid4().hex[:6]}")
    try:
        warn_fresh_cluster(RuntimeConfig())
    finally:
        set_name(None)
    assert "is up: starting one for this call with UNTRAINED weights (seed 0)" in capsys.readouterr().err


def test_bad_cluster_name():
    r = run("--name", "a/b", "status")
    assert r.exit_code == 2 and "--name = 'a/b': expected letters, digits" in r.stderr


def test_help_shows_no_bool_type_for_flags():
    r = run("train", "--help")
    assert r.exit_code == 0 and "--in-process" in r.stdout and "<bool>" not in r.stdout
    assert "N MORE steps" in r.stdout


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("moe-runtime ") and "torch" in r.stdout and "ray" in r.stdout


def test_plot_of_a_steps_log(tmp_path):
    import json

    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 5.0 - i / 10, "lr": 1e-3, "grad_norm": 1.0, "step_s": 0.1,
                                       "imbalance": 1.1, "rebalances": int(i > 2), "rebalanced": i == 3}) + "\n"
                           for i in range(6)))
    r = run("plot", str(log), "-o", str(tmp_path / "run.png"))
    assert r.exit_code == 0 and (tmp_path / "run.png").stat().st_size > 5000
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    r = run("plot", str(tmp_path / "bad.jsonl"))
    assert r.exit_code == 2 and "bad.jsonl, line 1: not JSON" in r.stderr


def test_resume_without_a_checkpoint(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ntrain: {{checkpoint_dir: {tmp_path / 'none'}}}\n")
    r = run("--name", f"res-{uuid.uuid4().hex[:6]}", "train", "--config", str(cfg), "--resume", "--steps", "1")
    assert r.exit_code == 2 and "--resume: no checkpoint to resume from under train.checkpoint_dir" in r.stderr
