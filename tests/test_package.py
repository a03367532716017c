"""pip-installable: a wheel built from the checkout, installed into a fresh virtual environment in a
temporary folder, gives the `ahiq` command and the package from outside the checkout. The environment
reuses this one's dependencies (torch and the rest) instead of downloading them."""
import importlib.util
import site
import subprocess
import sys
import zipfile

from conftest import ROOT


def _run(command, cwd):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_a_built_wheel_installs_the_package_and_the_command(tmp_path):
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(ROOT)], tmp_path)
    wheel = next((tmp_path / "dist").glob("ahiq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ahiq/zoo.py" in names and "ahiq/data/labels.py" in names and not any(n.startswith("tests/") for n in names)
    env = tmp_path / "env"
    _run([sys.executable, "-m", "venv", str(env)], tmp_path)
    python = env / "bin" / "python"
    packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    # This environment's packages after the new one's own (a .pth line is not a site folder, so this one's
    # editable install of the checkout is not seen there).
    (tmp_path / packages / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)
    assert "usage: ahiq [-h] {score,download,launch,zoo}" in _run([str(env / "bin" / "ahiq"), "--help"], tmp_path)
    where = _run([str(python), "-c", "import ahiq, ahiq.zoo; print(ahiq.__file__)"], tmp_path).strip()
    assert where.startswith(str(env)), where  # the installed copy, not the checkout
