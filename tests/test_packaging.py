"""What users install: the wheel and the sdist hatchling builds from this tree, the distribution's name,
and the version every place reports.

The distribution is ``mps-score`` (``mps-cli`` on the package index is an unrelated project); the import
name stays ``mps_cli`` and the command ``mps``.
"""

from __future__ import annotations

import email
import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from mps_cli import __version__

PACKAGE_DATA = ("mps_cli/engine/bpe_simple_vocab_16e6.txt.gz", "mps_cli/engine/CLIP-LICENSE.txt")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The wheel and the sdist of this tree, built as pip's build step would (hatchling, in this process)."""
    hatchling = pytest.importorskip("hatchling.builders.wheel")
    from hatchling.builders.sdist import SdistBuilder

    out = tmp_path_factory.mktemp("dist")
    [wheel] = hatchling.WheelBuilder(str(REPO)).build(directory=str(out), versions=["standard"])
    [sdist] = SdistBuilder(str(REPO)).build(directory=str(out), versions=["standard"])
    return {"wheel": Path(wheel), "sdist": Path(sdist)}


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as whl:
        [name] = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(whl.read(name))


def test_wheel_and_sdist_carry_the_vocabulary_and_its_licence(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        for name in PACKAGE_DATA:
            assert whl.read(name) == (REPO / "src" / name).read_bytes(), name
    with tarfile.open(built["sdist"]) as sdist:
        top = built["sdist"].name.removesuffix(".tar.gz")
        for name in PACKAGE_DATA:
            assert sdist.extractfile(f"{top}/src/{name}").read() == (REPO / "src" / name).read_bytes(), name


def test_runtime_requirements_pull_neither_open_clip_nor_torchvision_nor_timm(built):
    meta = _metadata(built["wheel"])
    assert meta["Name"] == "mps-score" and meta["Version"] == __version__
    requires = meta.get_all("Requires-Dist")

    def extra(req: str) -> str | None:
        found = re.search(r"""extra == ['"](\w+)['"]""", req)
        return found and found.group(1)

    runtime = [r for r in requires if extra(r) is None]
    assert any(r.startswith("torch") for r in runtime)
    assert not [r for r in runtime if re.match(r"(open[-_]clip|torchvision|timm)", r, re.I)], runtime
    # open_clip_torch stays the tests' reference, in the test extra only.
    assert {extra(r) for r in requires if re.match(r"open[-_]clip", r, re.I)} == {"test"}
    ray = [r for r in requires if r.startswith("ray") and extra(r) == "ray"]
    assert len(ray) == 1 and "<3" in ray[0] and "2.64" not in ray[0], ray


def test_console_script_is_mps(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        [name] = [n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = whl.read(name).decode()
    assert re.search(r"^mps = mps_cli\.cli:main$", entry_points, re.M), entry_points


def test_name_and_version_agree_everywhere(built):
    name = _metadata(built["wheel"])["Name"]
    assert run_cli("--version").stdout.strip() == f"{name} {__version__}"
    assert run_cli("info").stdout.splitlines()[0].startswith(f"{name} {__version__} (python ")
    doc = json.loads(run_cli("info", "--json").stdout)
    assert (doc["distribution"], doc["version"]) == (name, __version__)
    readme = (REPO / "README.md").read_text()
    assert readme.splitlines()[0] == f"# {name}"
    assert "import mps_cli" in readme or "from mps_cli import" in readme
