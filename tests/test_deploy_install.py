"""deploy/install.sh into a staging root (never the real /), and deploy/systemd/ through `systemd-analyze verify`.

The install builds a real virtual environment with `pip install --no-deps` of this checkout
(about 10 s each), so these tests are marked slow. `systemd-analyze` comes with Debian's
systemd package, which `make setup` (deploy/services.sh install) installs when it is missing.
"""

from __future__ import annotations

import marshal
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.settings import load_config

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "deploy" / "install.sh"
UNITS = ("genclip@.service", "genclip-train@.service", "genclip-train@.timer")
LINES = ("line-1", "line-2")
PREFIX = "/opt/genclip"
runner = CliRunner()


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENCLIP_")}
    result = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if check:
        assert result.returncode == 0, f"install.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under root (the venv's lib/ summarised) with its type and permission bits."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "/venv/lib/" in f"/{rel}/" or "/venv/include/" in f"/{rel}/":
            continue
        mode = path.lstat().st_mode
        kind = "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file"
        found[rel] = (kind, stat.S_IMODE(mode))
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("GENCLIP_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install") / "root"
    result = install(root, *("--line", LINES[0], "--line", LINES[1]), "--pip-args", "--no-deps")
    assert "systemctl enable --now genclip@line-1" in result.stdout  # the next steps are printed
    return root


# --- arguments (fast) ------------------------------------------------------------------------------
def test_help_and_bad_arguments(tmp_path):
    result = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--line", "--prefix", "--root", "--python", "--pip-args", "--extras", "--uninstall", "--purge"):
        assert option in result.stdout
    for args, message in [
        (("--line", "Line 1"), "bad line name"),
        (("--purge",), "--purge goes with --uninstall"),
        (("--uninstall", "--line", "line-1"), "--line does not go with --uninstall"),
        (("--prefix", "opt/x"), "--prefix must be an absolute path"),
        (("--prefix", "/opt/../x"), "--prefix: give a plain absolute directory"),
        (("--prefix", "/"), "--prefix: give a plain absolute directory"),
        (("--bogus",), "unknown argument: --bogus"),
        (("--extras", "pylon;rm"), "bad --extras"),
    ]:
        result = install(tmp_path / "root", *args, check=False)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "root").exists()  # refused before touching anything


# --- the staged tree -------------------------------------------------------------------------------
@pytest.mark.slow
def test_staged_tree_layout_and_modes(staged):
    venv = staged / PREFIX.lstrip("/") / "venv"
    genclip = venv / "bin" / "genclip"
    assert genclip.is_file() and os.access(genclip, os.X_OK)
    # Relocatable: the scripts run the final venv's Python, not the staging path.
    assert genclip.read_text().splitlines()[0] == f"#!{PREFIX}/venv/bin/python"
    assert f'VIRTUAL_ENV="{PREFIX}/venv"' in (venv / "bin" / "activate").read_text()
    assert not (venv.parent / "venv.new").exists() and not (venv.parent / "venv.old").exists()
    leaks = [
        p for p in venv.rglob("*") if p.is_file() and not p.is_symlink() and str(staged).encode() in p.read_bytes()
    ]
    assert leaks == [], f"staging path left in {leaks[:5]}"
    # Byte-code is compiled in advance (the service cannot write the venv) and names the final paths.
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    pyc = next((site / "cli" / "__pycache__").glob("main.*.pyc"))
    code = marshal.loads(pyc.read_bytes()[16:])
    assert code.co_filename == f"{PREFIX}/venv/{site.relative_to(venv)}/cli/main.py"

    for unit in UNITS:  # default prefix: installed exactly as shipped
        installed = staged / "etc/systemd/system" / unit
        assert installed.read_text() == (REPO / "deploy/systemd" / unit).read_text() and mode(installed) == 0o644
    sysusers = (staged / "usr/lib/sysusers.d/genclip.conf").read_text()
    assert any(line.split()[:2] == ["u", "genclip"] for line in sysusers.splitlines())
    tmpfiles = (staged / "usr/lib/tmpfiles.d/genclip.conf").read_text()
    assert "d /etc/genclip 0750 root genclip" in tmpfiles and "d /var/lib/genclip 0750 genclip genclip" in tmpfiles

    assert mode(staged / "etc/genclip") == 0o750
    assert mode(staged / "etc/genclip/credentials") == 0o700
    state = staged / "var/lib/genclip"
    assert mode(state) == 0o750
    for line in LINES:
        assert mode(staged / f"etc/genclip/{line}.toml") == 0o640
        creds = staged / "etc/genclip/credentials" / line
        assert mode(creds) == 0o700
        for name in ("mqtt-password", "redis-password", "opcua-users", "page-token", "page-password"):
            assert (creds / name).read_bytes() == b"" and mode(creds / name) == 0o600
        assert_opcua_certificate(creds, line)
        for sub in ("prompts", "profiles", "reference", "runs"):
            assert mode(state / sub / line) == 0o750
    assert (state / "hf-cache").is_dir() and (state / "weights").is_dir()


def assert_opcua_certificate(creds: Path, line: str) -> None:
    """install.sh's OPC UA certificate: the line's application URI, the key usages OPC UA asks for, its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    assert mode(creds / "opcua-key") == 0o600
    cert = x509.load_der_x509_certificate((creds / "opcua-cert").read_bytes())
    key = load_pem_private_key((creds / "opcua-key").read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:genclip-inspect:{line}"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.data_encipherment
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]


@pytest.mark.slow
def test_staged_configs_load_and_point_at_the_layout(staged):
    """The project's own loader accepts them (the state folders need not exist: only weights,
    checkpoint and model_config files are checked at load), with each line's id and paths."""
    ports = set()
    for line in LINES:
        path = staged / f"etc/genclip/{line}.toml"
        cfg = load_config(path)
        assert cfg.line.id == line
        state = Path("/var/lib/genclip")
        assert cfg.agent.prompt_dir == state / "prompts" / line
        assert cfg.model.profile_dir == state / "profiles" / line
        assert cfg.model.cache_dir == state / "hf-cache"
        assert cfg.trainer.out_dir == state / "runs" / line and cfg.trainer.publish_dir == state / "prompts" / line
        assert cfg.mqtt.password is None and cfg.redis.password is None
        assert "line-1" not in path.read_text() or line == "line-1"
        ports.add(cfg.agent.health_port)
        result = runner.invoke(app, ["config", "check", "--config", str(path)])
        assert result.exit_code == 0 and f"line {line} " in result.output, result.output
    assert ports == {8321, 8322}  # two lines on one machine need two health ports


# --- systemd's own tools on the staged files -------------------------------------------------------
def systemd_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} not found: run `make setup` (deploy/services.sh install adds Debian's systemd package)")
    return found


def systemd_analyze() -> str:
    return systemd_tool("systemd-analyze")


@pytest.mark.slow
def test_sysusers_and_tmpfiles_files_give_the_staged_tree_its_user_and_owners(staged, tmp_path):
    """What a package's postinst (or the first boot) does with a --root tree: the user, then the owners."""
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles must be root to chown")
    root = tmp_path / "target"
    for part in ("usr/lib/sysusers.d", "usr/lib/tmpfiles.d", "etc/genclip", "var/lib/genclip"):
        shutil.copytree(staged / part, root / part, symlinks=True)
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        args = [systemd_tool(tool), f"--root={root}"] + (["--create"] if tool == "systemd-tmpfiles" else [])
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "genclip" not in result.stderr.replace("'genclip'", ""), result.stderr
    user = next(
        line.split(":") for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("genclip:")
    )
    uid, gid, home = int(user[2]), int(user[3]), user[5]
    assert home == "/var/lib/genclip" and uid < 1000  # a system user
    config = (root / "etc/genclip/line-1.toml").stat()
    assert (config.st_uid, config.st_gid, stat.S_IMODE(config.st_mode)) == (0, gid, 0o640)
    assert (root / "etc/genclip").stat().st_gid == gid
    assert (root / "etc/genclip/credentials/line-1/mqtt-password").stat().st_uid == 0
    for path in (
        root / "var/lib/genclip",
        root / "var/lib/genclip/prompts/line-1",
        root / "var/lib/genclip/runs/line-2",
    ):
        assert (path.stat().st_uid, path.stat().st_gid, mode(path)) == (uid, gid, 0o750), path


def verify_root(staged: Path, target: Path) -> Path:
    """A root for `systemd-analyze verify --root`: the units and ExecStart binary exactly as install.sh staged
    them, plus what the units lean on from the system (systemd's own units, /bin/kill)."""
    shutil.copytree(staged / "etc/systemd/system", target / "etc/systemd/system", symlinks=True)
    genclip = target / PREFIX.lstrip("/") / "venv/bin/genclip"
    genclip.parent.mkdir(parents=True)
    shutil.copy2(staged / PREFIX.lstrip("/") / "venv/bin/genclip", genclip)
    system_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system_units, target / "usr/lib/systemd/system", symlinks=True)
    (target / "usr/bin").mkdir(parents=True)
    shutil.copy2(shutil.which("kill") or "/bin/kill", target / "usr/bin/kill")
    (target / "bin").symlink_to("usr/bin")
    return target


def verify(root: Path, *units: str) -> list[str]:
    """Problems `systemd-analyze verify` reports about our units. It exits 0 on an unknown key
    (a warning), so every line of its output that names one of our files counts too."""
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "genclip" in line]
    if result.returncode != 0:
        ours.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return ours


INSTANCES = ("genclip@line-1.service", "genclip-train@line-1.service", "genclip-train@line-1.timer")


@pytest.mark.slow
def test_units_pass_systemd_analyze_verify(staged, tmp_path):
    root = verify_root(staged, tmp_path / "verify")
    assert verify(root, *INSTANCES) == []


@pytest.mark.slow
def test_verify_catches_a_misspelt_directive_in_each_unit(staged, tmp_path):
    for unit, instance in zip(UNITS, INSTANCES, strict=True):
        root = verify_root(staged, tmp_path / unit)
        path = root / "etc/systemd/system" / unit
        text = path.read_text()
        key = (
            "WatchdogSec=" if unit == "genclip@.service" else "TimeoutStartSec=" if "service" in unit else "Persistent="
        )
        assert key in text
        path.write_text(text.replace(key, key[:-1] + "s=", 1))
        problems = verify(root, instance)
        assert any("Unknown key" in p and unit in p for p in problems), problems
        path.write_text(text.replace("ExecStart=/opt/genclip/venv/bin/genclip", "ExecStart=/opt/genclip/venv/bin/nope"))
        if unit.endswith(".service"):
            assert any("nope" in p for p in verify(root, instance))


# --- again, other prefix, uninstall ----------------------------------------------------------------
@pytest.mark.slow
def test_second_run_changes_nothing_it_must_keep(staged):
    config = staged / "etc/genclip/line-1.toml"
    config.write_text(config.read_text() + "\n# edited on the line\n")
    password = staged / "etc/genclip/credentials/line-1/mqtt-password"
    password.write_text("s3cret\n")
    before = tree(staged)
    result = install(staged, "--line", "line-1", "--line", "line-2", "--pip-args", "--no-deps")
    assert "exists, left as it is" in result.stdout
    assert config.read_text().endswith("# edited on the line\n") and password.read_text() == "s3cret\n"
    assert tree(staged) == before
    assert (staged / PREFIX.lstrip("/") / "venv/bin/genclip").read_text().startswith(f"#!{PREFIX}/venv/bin/python")


@pytest.mark.slow
def test_other_prefix_rewrites_the_units(tmp_path):
    root = tmp_path / "root"
    result = install(root, "--prefix", "/srv/apps/genclip", "--pip-args", "--no-deps")
    assert "No line configured yet" in result.stdout and list((root / "etc/genclip").glob("*.toml")) == []
    assert (root / "srv/apps/genclip/venv/bin/genclip").read_text().startswith("#!/srv/apps/genclip/venv/bin/python")
    for unit in UNITS:
        text = (root / "etc/systemd/system" / unit).read_text()
        assert "/opt/genclip" not in text
    service = (root / "etc/systemd/system/genclip@.service").read_text()
    assert "ExecStart=/srv/apps/genclip/venv/bin/genclip run --config /etc/genclip/%i.toml" in service
    install(root, "--prefix", "/srv/apps/genclip", "--uninstall", "--purge")
    assert list(root.iterdir()) == []


@pytest.mark.slow
def test_uninstall_keeps_configs_and_state_and_purge_removes_everything(staged):
    enabled = staged / "etc/systemd/system/multi-user.target.wants/genclip@line-1.service"
    enabled.parent.mkdir(parents=True, exist_ok=True)
    enabled.symlink_to("/etc/systemd/system/genclip@.service")
    (staged / "var/lib/genclip/prompts/line-1/best.safetensors").write_bytes(b"prompts")

    install(staged, "--uninstall")
    left = tree(staged)
    # Nothing but the configs and the state (venv, units, the enabled symlink, sysusers/tmpfiles: gone).
    assert all(p in ("etc", "var", "var/lib") or p.startswith(("etc/genclip", "var/lib/genclip")) for p in left), left
    assert {
        "etc/genclip/line-1.toml",
        "etc/genclip/line-2.toml",
        "etc/genclip/credentials/line-1/mqtt-password",
    } <= set(left)
    assert (staged / "var/lib/genclip/prompts/line-1/best.safetensors").read_bytes() == b"prompts"

    install(staged, "--uninstall", "--purge")
    assert list(staged.iterdir()) == []
    install(staged, "--uninstall", "--purge")  # nothing left to remove: still fine
