"""The committed experiment suites (configs/experiments/) load, and `make results` runs every CPU
suite: a typo in a suite file or a suite missing from the Makefile shows here, not hours into a
run."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from padnet.train.config import load_config
from padnet.train.sweep import load_suite, suite_name

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
# the other files there are the base configs of suites
SUITES = [p for p in FILES if re.search(r"^variants:", p.read_text(), re.MULTILINE)]


def make_suites() -> list[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^SUITES\s*:=\s*(.+)$", text, re.MULTILINE)
    assert match, "the Makefile defines no SUITES"
    return match.group(1).split()


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_suite_file_loads_and_writes_under_its_own_name(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a one-shot IMP that would score nothing
        runs = load_suite(path)
    name = suite_name(path)
    assert name == path.stem
    assert runs and len({r.name for r in runs}) == len(runs)
    assert all(Path(r.cfg.out_dir).parent == Path("results/experiments") / name for r in runs)


@pytest.mark.parametrize("path", [p for p in FILES if p not in SUITES],
                         ids=[p.stem for p in FILES if p not in SUITES])
def test_base_config_loads(path: Path) -> None:
    assert load_config(path).epochs > 0


def test_make_results_runs_every_cpu_suite() -> None:
    listed = make_suites()
    assert all((ROOT / "configs" / "experiments" / f"{s}.yaml").is_file() for s in listed)
    # fmnist_resnet8_cpu, the first short recipe, is kept for the record only
    cpu = {p.stem for p in SUITES if p.stem.endswith("_cpu")} - {"fmnist_resnet8_cpu"}
    assert cpu <= set(listed), f"not in `make results`: {sorted(cpu - set(listed))}"
