"""The first hour of a new user (issue 16): errors are one line with exit status 2 before anything heavy runs, the
defaults are the published ALLO settings (the README's table), `allo-train config` prints every key, a run ends with a
summary and logs progress lines when there is no terminal, and the plots say what they show."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from allo_train import cli, metrics, stages
from allo_train.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *, cwd: Path = ROOT, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("allo-train: error: "), stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ config errors
def test_a_config_error_is_one_line_before_torch_is_imported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: m\nimprove:\n  mask_fraction: 1.5\n")
    code = (
        "import sys\nfrom allo_train.cli import main\n"
        f"rc = main(['pipeline', '--config', {str(bad)!r}])\n"
        "print('torch imported:', 'torch' in sys.modules)\nsys.exit(rc)\n"
    )
    r = run_python(code)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "'improve.mask_fraction' must be in [0, 1), got 1.5" in line
    assert r.stdout.strip() == "torch imported: False"  # the stage table and config.py import no torch


def test_choices_owned_elsewhere_are_checked_after_the_structure():
    # A bad key later in the file is found before the owners of the choice lists are imported.
    with pytest.raises(ValueError, match=r"unknown config key 'improve\.mask_fractio'"):
        load_config(None, {"improve.loss_type": "kto", "improve.mask_fractio": 0.5})
    with pytest.raises(ValueError, match=r"'improve.loss_type' must be one of \['sigmoid'"):
        load_config(None, {"improve.loss_type": "kto"})


# ------------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from allo_train.model import build_tiny_llama
    from allo_train.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("cli_assets")
    build_tiny_llama(build_char_tokenizer(save_dir=d / "tok"), d / "model", hidden_size=16, num_layers=1, num_heads=2)
    rows = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(10, 16)]
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def write_config(tmp_path: Path, assets: Path, **changes) -> Path:
    cfg = {
        "model_name_or_path": str(assets / "model"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "max_length": 16,
        "max_prompt_length": 8,
        "pipeline": {"stages": ["warmup", "locate", "improve"]},
        "warmup": {"data_path": str(assets / "pref.jsonl")},
        "improve": {"data_path": str(assets / "pref.jsonl")},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_error(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    captured = capsys.readouterr()
    return one_error_line(captured.err)


def test_a_missing_model_directory_is_named_before_anything_runs(tmp_path, assets, capsys):
    cfg = write_config(tmp_path, assets, model_name_or_path=str(tmp_path / "no-model"))
    line = cli_error(capsys, "pipeline", "--config", str(cfg))
    assert f"config key 'model_name_or_path': '{tmp_path / 'no-model'}' does not exist" in line
    assert not (tmp_path / "out").exists()  # no lock file, no stage directory: nothing started
    (tmp_path / "empty-dir").mkdir()
    cfg = write_config(tmp_path, assets, model_name_or_path=str(tmp_path / "empty-dir"))
    assert "has no config.json" in cli_error(capsys, "warmup", "--config", str(cfg))


def test_a_stage_whose_starting_model_is_not_there_says_which_stage_to_run(tmp_path, assets, capsys):
    cfg = write_config(tmp_path, assets, **{"pipeline.stages": ["warmup", "locate", "forget", "improve"]})
    line = cli_error(capsys, "improve", "--config", str(cfg))
    assert "improve starts from forget's output" in line and str(tmp_path / "out" / "forget" / "model") in line
    assert line.endswith("run forget first")


def test_locate_alone_checks_the_warm_model_and_grad_data_before_anything_runs(tmp_path, assets, capsys):
    # locate.method (default weight_delta) compares with warmup's output; method grad reads a data file. Both are
    # checked before the run starts, whichever key (method, or its earlier name importance) says so.
    for key, value in (("locate.method", "weight_delta"), ("locate.importance", "delta")):
        cfg = write_config(tmp_path, assets, **{"pipeline.stages": ["warmup", "locate"], key: value})
        line = cli_error(capsys, "locate", "--config", str(cfg))
        assert "locate compares with warmup's output" in line and line.endswith("run warmup first")
    for key, value in (("locate.method", "grad"), ("locate.importance", "grad")):
        over = {"pipeline.stages": ["locate"], key: value, "warmup.data_path": None}
        cfg = write_config(tmp_path, assets, **over)
        line = cli_error(capsys, "locate", "--config", str(cfg))
        assert "config key 'locate.data_path' (or warmup.data_path) is required for method 'grad'" in line
    assert not (tmp_path / "out").exists()


def test_an_unknown_earlier_locate_importance_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: m\nlocate:\n  importance: weights\n")
    r = run_python(
        f"import sys\nfrom allo_train.cli import main\nsys.exit(main(['pipeline', '--config', {str(bad)!r}]))\n"
    )
    assert r.returncode == 2
    assert "'locate.importance' must be one of ['delta', 'grad'], got 'weights'" in one_error_line(r.stderr)


def test_missing_and_empty_data_files_are_named(tmp_path, assets, capsys):
    cfg = write_config(tmp_path, assets, **{"improve.data_path": str(tmp_path / "nope.jsonl")})
    line = cli_error(capsys, "pipeline", "--config", str(cfg))
    assert f"config key 'improve.data_path': data file '{tmp_path / 'nope.jsonl'}' does not exist" in line
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    cfg = write_config(tmp_path, assets, **{"warmup.data_path": str(tmp_path / "empty.jsonl")})
    line = cli_error(capsys, "pipeline", "--config", str(cfg))
    assert f"config key 'warmup.data_path': data file '{tmp_path / 'empty.jsonl'}' is empty" in line
    cfg = write_config(tmp_path, assets, **{"improve.data_path": None})
    assert "config key 'improve.data_path' is required for the improve stage" in cli_error(
        capsys, "pipeline", "--config", str(cfg)
    )


def test_a_malformed_line_of_a_later_stage_is_found_before_the_first_stage_trains(tmp_path, assets, capsys):
    lines = (assets / "pref.jsonl").read_text().splitlines()
    lines[3] = lines[3][:-1]  # the closing brace lost: the error is at the end of the line
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path, assets, **{"improve.data_path": str(broken)})
    line = cli_error(capsys, "pipeline", "--config", str(cfg))
    column = len(lines[3]) + 1
    assert f"{broken}:4: invalid JSON at column {column} (the end of the line)" in line
    assert not (tmp_path / "out").exists()


def test_errors_under_a_launcher_are_one_line_from_one_process(tmp_path, assets):
    """2 ranks as torchrun / the deepspeed launcher start them, a data line missing a field: the stage finds it after
    the process group exists. Every rank stops with status 2, one line from the first process, no traceback. (Errors
    found before the group exists take the same way out, tested in-process above.)"""
    from test_train_pipeline import launch

    lines = (assets / "pref.jsonl").read_text().splitlines()
    data = tmp_path / "missing_field.jsonl"
    data.write_text("\n".join([*lines[:2], '{"prompt": "1+1=", "chosen": "2"}', *lines[2:]]) + "\n")
    codes, outs = launch(write_config(tmp_path, assets, **{"warmup.data_path": str(data)}), timeout=300)
    assert codes == [2, 2], outs
    assert all("Traceback" not in out for out in outs), outs
    errors = [[line for line in out.splitlines() if line.startswith("allo-train: error: ")] for out in outs]
    assert errors[1] == [] and len(errors[0]) == 1, outs
    assert f"{data}:3: missing field 'rejected'" in errors[0][0]


# ------------------------------------------------------------------------------------------------ help and config
def test_help_has_no_doc_markup_and_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    for command in (*stages.STAGES, "pipeline", "config", "correct-answers", "demo"):
        assert command in out


def config_keys(obj, prefix: str = "") -> list[str]:
    """Every dotted key of a config, walking the dataclasses (the stage sections as top-level keys)."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "sections":
            for name, section in value.items():
                keys += config_keys(section, f"{name}.")
        elif dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_allo_train_config_prints_every_key_with_a_comment(capsys, monkeypatch):
    import example_stage

    monkeypatch.setitem(stages.STAGES, "chosen_sft", example_stage.CHOSEN_SFT)  # a stage added later shows up too
    assert cli.main(["config"]) == 0
    text = capsys.readouterr().out
    cfg = load_config()
    assert yaml.safe_load(text) == config_to_dict(cfg)
    keys = config_keys(cfg)
    assert "chosen_sft.loss_scale" in keys and "improve.mask_fraction" in keys and "pipeline.stages" in keys
    section = None
    commented = set()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        indent, key = re.match(r"(\s*)([\w]+):", line).groups()
        section = key if not indent else section
        if "  # " in line:
            commented.add(f"{section}.{key}" if indent else key)
    assert set(keys) <= commented
    # One stage, and what a run with a config and overrides would use.
    assert cli.main(["config", "improve", "improve.mask_fraction=0.5", "--learning_rate", "1e-5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert list(shown) == ["improve"]
    assert shown["improve"]["mask_fraction"] == 0.5 and shown["improve"]["learning_rate"] == 1e-5
    assert cli.main(["config", "polish"]) == 2
    assert "stage must be one of" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ defaults
def readme_defaults_table() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Defaults: the published ALLO settings", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[2].startswith("`"):
            rows.append((cells[0], cells[2].strip("`"), cells[3].strip("`")))
    return rows


def test_the_readme_defaults_table_is_the_config():
    rows = readme_defaults_table()
    assert len(rows) >= 25
    resolved = config_to_dict(load_config())
    for setting, key, default in rows:
        node = resolved
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(default), (setting, key, node, default)
    keys = {key for _, key, _ in rows}
    # Every stage default the dataclasses declare is in the table, with its source.
    for name, spec in stages.STAGES.items():
        for f in dataclasses.fields(spec.section):
            if "stage_default" in f.metadata:
                assert f"{name}.{f.name}" in keys, f"{name}.{f.name}"
    assert load_config().improve.mask_fraction == 0.9  # ALLO keeps 10% of the rejected tokens: drops 90%


# ------------------------------------------------------------------------------------------------ output
def test_progress_lines_come_every_tenth_of_the_stage_and_at_the_end(monkeypatch):
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    said = []
    lines = metrics.ProgressLines("improve", 40, 0, said.append)
    for step in range(1, 41):
        lines.update(step, {"loss": 0.5, "rewards/margins": 0.25, "learning_rate": 5e-6})
    assert [int(re.match(r"improve: step (\d+)/40", s).group(1)) for s in said] == [4 * k for k in range(1, 11)]
    assert said[0].startswith("improve: step 4/40 (10%) loss 0.5000 rewards/margins 0.2500 learning_rate 5.00e-06")
    assert "left" in said[0] and "left" not in said[-1]
    monkeypatch.setattr(metrics.sys.stdout, "isatty", lambda: False, raising=False)
    assert metrics.progress_bars() is False


def test_without_a_terminal_the_hugging_face_bars_are_off_too(monkeypatch):
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(metrics.sys.stdout, "isatty", lambda: False, raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    try:
        metrics.quiet_library_progress_bars()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for a transformers imported later (the CLI)
        assert not transformers_logging.is_progress_bar_enabled()  # "Loading weights" bars of one imported already
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's own setting stays
        metrics.quiet_library_progress_bars()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    finally:
        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()


def test_summary_table_has_a_row_per_stage():
    from allo_train.run import Run
    from allo_train.trainer import summary_table

    cfg = load_config(None, {"output_dir": "o"})
    run = Run(cfg, 0, 1, torch.device("cpu"))
    run.notes = {
        "warmup": {"steps": 30, "metrics": {"loss": 0.61, "rewards/margins": 1.25}, "trained_fraction": 1.0},
        "locate": {"trained_fraction": 0.05, "output": Path("o/locate/masks.safetensors"), "seconds": 2.0},
        "forget": {"output": Path("o/forget/model"), "skipped": True},
        "improve": {"steps": 240, "metrics": {"loss": 0.4}, "trained_fraction": 0.05, "seconds": 75.0},
    }
    run.notes["warmup"]["seconds"] = 12.5
    lines = summary_table(run, ["warmup", "locate", "forget", "improve"]).splitlines()
    assert lines[0] == "summary:"
    assert lines[1].split() == [
        "stage",
        "steps",
        "objective",
        "final",
        "loss",
        "reward",
        "margin",
        "trained",
        "time",
        "output",
    ]
    warmup, locate, forget, improve = lines[2:]
    assert warmup.split()[:6] == ["warmup", "30", "DPO", "0.6100", "1.2500", "100.0%"]
    assert locate.split()[1:] == ["-", "-", "-", "-", "5.0%", "2.0", "s", "o/locate/masks.safetensors"]
    assert "finished earlier" in forget and forget.endswith("o/forget/model")
    assert "DPO, 90% of rejected tokens dropped" in improve and "1 min 15 s" in improve


# ------------------------------------------------------------------------------------------------ plots
def test_loss_plots_name_their_loss_and_label_every_axis(tmp_path):
    from allo_train.demo import loss_curves_figure

    cfg = load_config()
    records = [{"stage": "improve", "step": s, "loss": 1.0 / s, "eval/loss": 1.1 / s} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    label = stages.loss_label(stages.STAGES["improve"], cfg.improve)
    assert label == "DPO, 90% of rejected tokens dropped"
    series = metrics.read_curves(path, ("loss", "eval/loss"))["improve"]
    (ax,) = metrics.loss_curve_figure("improve", series, loss_name=label).axes
    assert ax.get_title() == f"improve: {label}" and ax.get_ylabel() == "loss"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "held-out"]
    names = {s: stages.loss_label(stages.STAGES[s], cfg.section(s)) for s in ("sft", "warmup", "forget", "improve")}
    assert names["sft"].startswith("cross-entropy") and names["warmup"] == "DPO"
    assert names["forget"] == "token-weighted NPO"
    panels = {f"run {s}": (path, name) for s, name in names.items()}
    fig = loss_curves_figure(panels)
    assert len(fig.axes) == 4
    for ax, (title, (_, name)) in zip(fig.axes, panels.items()):
        assert ax.get_title() == f"{title}\n{name}" and ax.get_ylabel() == "loss" and ax.get_xlabel()


def test_mask_heatmap_labels_its_colour_bar_and_hatches_excluded_modules():
    from allo_train.locate import (
        DEFAULT_EXCLUDE,
        HEATMAP_COLORBAR_LABEL,
        HEATMAP_EXCLUDED_LABEL,
        mask_heatmap_figure,
        mask_stats,
    )

    shapes = {}
    for layer in range(3):
        for name in ("self_attn.q_proj", "mlp.up_proj"):
            shapes[f"model.layers.{layer}.{name}.weight"] = (4, 4)
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (4,)
    masks = {n: torch.zeros(s[0], dtype=torch.bool) for n, s in shapes.items()}
    masks["model.layers.1.mlp.up_proj.weight"][:2] = True
    stats = mask_stats(masks, shapes, exclude=DEFAULT_EXCLUDE)
    assert stats["layers"]["0"]["modules"]["input_layernorm"]["excluded"] is True
    assert stats["layers"]["0"]["modules"]["mlp.up_proj"]["excluded"] is False
    fig = mask_heatmap_figure(stats)
    heat, bar = fig.axes
    assert bar.get_ylabel() == HEATMAP_COLORBAR_LABEL
    hatched = [p for p in heat.patches if p.get_hatch()]
    assert len(hatched) == 3  # input_layernorm in each of the 3 layers: grey and hatched
    column = [t.get_text() for t in heat.get_xticklabels()].index("input_layernorm")
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in hatched) == [(column, r) for r in range(3)]
    image = heat.images[0].get_array()
    assert image.mask[:, column].all() and not image.mask[:, column - 1].any()  # not drawn as "0 selected"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [HEATMAP_EXCLUDED_LABEL]
