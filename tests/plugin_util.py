"""Install a one-module plugin the way pip would for the tests: a package plus a dist-info folder whose
entry_points.txt names it in the suite's `semprior_bench.plugins` group, on sys.path and PYTHONPATH (so the
local launcher's job processes find it too)."""
from pathlib import Path


def install_plugin(tmp_path: Path, monkeypatch, package: str, source: str, entry: str) -> Path:
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(source)
    dist = site / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[semprior_bench.plugins]\n{entry} = {package}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site
