"""scripts/install.py, the Makefile's installer: uv is handed the indexes, find-links and constraints pip would use."""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("install", Path(__file__).parents[1] / "scripts" / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)


def test_uv_gets_pips_configuration_ranked_as_pip_ranks_it(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///a/simple file:///b/simple\nfind-links = /global\n"
                    "[install]\nfind-links = /install\n")
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_CONSTRAINT", "/env/constraints.txt")
    found = install.pip_config(sys.executable)
    assert found["extra-index-url"] == ["file:///a/simple", "file:///b/simple"]  # several values, in order
    assert found["find-links"] == ["/install"]  # [install] over [global]
    assert found["constraint"] == ["/env/constraints.txt"]  # a PIP_* variable over every file
    monkeypatch.setenv("PIP_FIND_LINKS", "/env")
    assert install.pip_config(sys.executable)["find-links"] == ["/env"]
