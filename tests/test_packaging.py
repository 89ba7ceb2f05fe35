"""Installation facts: one `tokenwise.*` namespace, entry points, a user project with packages named like ours."""

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_the_tokenwise_namespace():
    """pyproject.toml lists the packages by hand (the package-dir mapping needs it): a new subpackage left out of
    the list would be missing from a wheel install while the editable install still finds it."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(["tokenwise", *init.parent.relative_to(ROOT).parts])
               for top in ("trainer", "rl", "models", "kernels") for init in (ROOT / top).rglob("__init__.py")}
    assert set(project["packages"]) == folders
    assert project["package-dir"] == {f"tokenwise.{top}": top for top in ("trainer", "rl", "models", "kernels")}


def test_no_top_level_package_of_ours_is_importable():
    """We install only `tokenwise.*`: the names `trainer`, `rl`, `models`, `kernels` stay free for the user (and for
    Hugging Face's `kernels`, which transformers probes by that name)."""
    code = ("import importlib.util, sys\n"
            "import tokenwise.trainer.cli, tokenwise.models.decoder, tokenwise.kernels, tokenwise.rl.algorithm\n"
            "print([n for n in ('trainer', 'rl', 'models', 'kernels') if importlib.util.find_spec(n)],"
            " sorted({m.split('.')[0] for m in sys.modules} & {'trainer', 'rl', 'models', 'kernels'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(sys.executable).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] []"
    from transformers.utils import import_utils
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False


def _user_project(tmp_path: Path) -> Path:
    """A user's project folder with packages named like ours, which a working directory puts first on sys.path."""
    for name in ("models", "kernels", "trainer", "rl"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("WHO = 'the user'\n")
    return tmp_path


def test_cli_runs_from_a_project_with_its_own_models_and_kernels_packages(tmp_path):
    project = _user_project(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: user\nstages: [grpo]\n")
    exe = Path(sys.executable).parent / "tokenwise"
    for cmd in ([str(exe), "check", str(recipe)], [sys.executable, "-m", "tokenwise.trainer", "check", str(recipe)]):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=project)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "stages: [grpo]" in out.stdout


def test_console_script_and_module_entry_point():
    exe = Path(sys.executable).parent / "tokenwise"
    for cmd in ([str(exe), "--help"], [sys.executable, "-m", "tokenwise.trainer", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "train" in out.stdout and "resume" in out.stdout and "check" in out.stdout


def test_gpu_check_script_refuses_unknown_arguments_in_one_line():
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    out = subprocess.run(["bash", script, "--fast"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == \
        "gpu_check.sh: unknown argument '--fast' (allowed: --dry-run, --out DIR, --parts LIST)"
    out = subprocess.run(["bash", script, "--parts", "model,speed"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown part 'speed'" in out.stderr


def test_gpu_check_dry_run_builds_the_qwen2_model_and_runs_grpo_on_cpu(tmp_path):
    """The GPU check's own plumbing on CPU (`--dry-run`, two of its five parts: the whole dry run takes ~2 min and is
    run by hand, docs/benchmarks.md): a Qwen2 built from a config, 2 GRPO steps through the CLI, summary.json."""
    import json
    import os
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--parts", "model,grpo_bf16",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["ok"] is True
    assert set(summary["parts"]) == {"model", "grpo_bf16"}
    grpo = summary["parts"]["grpo_bf16"]
    assert grpo["steps"] == 2 and grpo["tokens_per_s"] > 0 and grpo["rc"] == 0
    assert summary["parts"]["model"]["num_hidden_layers"] == 2
