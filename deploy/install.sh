#!/usr/bin/env bash
# Installs GenCLIP Inspect on a line machine: a virtual environment, the system user, the
# directories, one config per line and the systemd units. Idempotent; see --help and docs/deploy.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash deploy/install.sh [OPTIONS]
       bash deploy/install.sh --uninstall [--purge] [--root DIR] [--prefix DIR]

Installs GenCLIP Inspect from this checkout (as root; run it again at any time to upgrade):
  PREFIX/venv/                        the program (PREFIX/venv/bin/genclip), rebuilt on every run
  /etc/genclip/<line>.toml            a config per --line, from config.toml (root:genclip 0640);
                                      an existing config is never overwritten
  /etc/genclip/credentials/<line>/    mqtt-password, redis-password, opcua-users, page-token,
                                      page-password: empty files (root 0600), handed to the service
                                      with LoadCredential= (empty = no password; no page login);
                                      opcua-cert, opcua-key: the OPC UA server's certificate (openssl)
  /var/lib/genclip/                   state, owned by genclip: prompts/<line>/, profiles/<line>/,
                                      reference/<line>/, runs/<line>/, hf-cache/, weights/
  /etc/systemd/system/                genclip@.service, genclip-train@.service, genclip-train@.timer
  /usr/lib/sysusers.d/genclip.conf    the system user genclip (created now when installing into /)
  /usr/lib/tmpfiles.d/genclip.conf    the directories' owners and modes

Options:
  --line NAME          configure a line (repeatable): lower-case letters, digits, '-', '_'
  --prefix DIR         where the venv goes (default /opt/genclip); the units are rewritten to match
  --root DIR           install into a staging tree DIR instead of / (packaging, tests): no user is
                       created, no systemctl is run, owners are left to the tmpfiles.d file; the venv's
                       scripts point at PREFIX, not DIR/PREFIX, so the tree can be copied to / as is
                       (on a machine with the same Python at the same path as --python)
  --python PATH        interpreter for the venv (default python3.11; needs 3.11+ with venv)
  --pip-args "ARGS"    extra arguments for pip install, word-split (e.g. "--no-deps", or
                       "--extra-index-url https://download.pytorch.org/whl/cu121")
  --extras LIST        optional parts to install, comma-separated: pylon (Basler cameras), genicam (any
                       GenTL producer through harvesters), opcua (the OPC UA server), e.g. --extras pylon,opcua
  --constraints FILE   pip constraints (default: constraints.txt of this checkout)
  --no-constraints     install without constraints
  --unit-dir DIR       where the units go (default /etc/systemd/system; packages: /usr/lib/systemd/system)
  --uninstall          stop and remove the units, the venv and the sysusers/tmpfiles files;
                       keep /etc/genclip (configs, credentials) and /var/lib/genclip (prompts, ...)
  --purge              with --uninstall: also remove /etc/genclip, /var/lib/genclip,
                       /var/cache/genclip and the genclip user
  -h, --help           this text
EOF
}

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$REPO_DIR/deploy/install_helper.py"
PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"

SERVICE_USER=genclip
CONF_DIR=/etc/genclip
CRED_DIR=/etc/genclip/credentials
STATE_DIR=/var/lib/genclip
CACHE_DIR=/var/cache/genclip
SYSUSERS_FILE=/usr/lib/sysusers.d/genclip.conf
TMPFILES_FILE=/usr/lib/tmpfiles.d/genclip.conf
UNITS=(genclip@.service genclip-train@.service genclip-train@.timer)
SHIPPED_PREFIX=/opt/genclip

ROOT=/
PREFIX=$SHIPPED_PREFIX
PYTHON=python3.11
PIP_ARGS=""
EXTRAS=""
CONSTRAINTS="$REPO_DIR/constraints.txt"
UNIT_DIR=/etc/systemd/system
LINES=()
UNINSTALL=0
PURGE=0
WORK=""
STAGED=""

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}
say() { echo "install.sh: $*"; }

cleanup() {
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        rm -rf "$WORK"
    fi
    # A venv that was not moved into place (pip failed, interrupted) is not left lying around.
    if [[ -n "$STAGED" && -d "$STAGED" ]]; then
        rm -rf "$STAGED"
    fi
}
trap cleanup EXIT

# A path inside the target tree: r /etc/genclip -> /etc/genclip, or DIR/etc/genclip with --root DIR.
r() { printf '%s%s' "${ROOT%/}" "$1"; }

live() { [[ "$ROOT" == / ]]; }

# systemd is the running init (PID 1), so systemctl can talk to it.
systemd_running() {
    live && [[ -d /run/systemd/system ]] && [[ "$(cat /proc/1/comm 2>/dev/null || true)" == systemd ]]
}

absolute() {
    case "$1" in
    /*) ;;
    *) die "$2 must be an absolute path, not '$1'" ;;
    esac
}

parse_args() {
    while (($#)); do
        case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --line)
            [[ $# -ge 2 ]] || die "--line needs a name"
            [[ "$2" =~ ^[a-z0-9][a-z0-9_-]{0,62}$ ]] ||
                die "bad line name '$2': 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit"
            LINES+=("$2")
            shift 2
            ;;
        --prefix | --root | --python | --pip-args | --extras | --constraints | --unit-dir)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
            --prefix) PREFIX="$2" ;;
            --root) ROOT="$2" ;;
            --python) PYTHON="$2" ;;
            --pip-args) PIP_ARGS="$2" ;;
            --extras)
                [[ "$2" =~ ^[a-z]+(,[a-z]+)*$ ]] || die "bad --extras '$2': names separated by commas (pylon,genicam)"
                EXTRAS="$2"
                ;;
            --constraints) CONSTRAINTS="$2" ;;
            --unit-dir) UNIT_DIR="$2" ;;
            esac
            shift 2
            ;;
        --no-constraints)
            CONSTRAINTS=""
            shift
            ;;
        --uninstall)
            UNINSTALL=1
            shift
            ;;
        --purge)
            PURGE=1
            shift
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
        esac
    done
    ((PURGE == 0 || UNINSTALL == 1)) || die "--purge goes with --uninstall"
    ((UNINSTALL == 0 || ${#LINES[@]} == 0)) || die "--line does not go with --uninstall"
    absolute "$PREFIX" --prefix
    absolute "$UNIT_DIR" --unit-dir
    PREFIX="${PREFIX%/}"
    # It goes into unit files (ExecStart=) and sed: plain names only, no '.'/'..' components.
    [[ "$PREFIX" =~ ^(/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)+$ ]] ||
        die "--prefix: give a plain absolute directory other than / (letters, digits, '._+-'), not '$PREFIX'"
    if [[ "$ROOT" != / ]]; then
        mkdir -p "$ROOT"
        ROOT="$(cd "$ROOT" && pwd)"
        [[ "$ROOT" != / ]] || ROOT=/
    fi
    if live && [[ $(id -u) -ne 0 ]]; then
        die "installing into / needs root (sudo bash deploy/install.sh ...), or use --root DIR for a staging tree"
    fi
}

# --- pieces ----------------------------------------------------------------------------------------

# ensure_dir MODE OWNER GROUP PATH: create it with that mode (and, into /, owner); an existing
# directory keeps what the administrator gave it.
ensure_dir() {
    local mode="$1" owner="$2" group="$3" path="$4"
    [[ -d "$path" ]] && return 0
    mkdir -p "$path"
    chmod "$mode" "$path"
    if live; then
        chown "$owner:$group" "$path"
    fi
}

# install_file MODE SOURCE TARGET: replace TARGET atomically when its content differs.
install_file() {
    local mode="$1" source="$2" target="$3" tmp
    mkdir -p "$(dirname "$target")"
    if [[ -f "$target" ]] && cmp -s "$source" "$target"; then
        chmod "$mode" "$target"
        return 0
    fi
    tmp="$(mktemp "$(dirname "$target")/.install.XXXXXX")"
    cat "$source" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$target"
    say "installed $target"
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11 (Debian: apt-get install python3.11-venv) or give --python PATH"
    "$PYTHON" -c 'import sys, venv, ensurepip, tomllib; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "$PYTHON is not Python >= 3.11 with venv and ensurepip (Debian: apt-get install python3.11-venv)"
}

write_sysusers() {
    local tmp="$WORK/sysusers.conf"
    cat >"$tmp" <<EOF
# GenCLIP Inspect (deploy/install.sh): the user of genclip@.service and genclip-train@.service.
# Cameras on /dev/video* are reached through SupplementaryGroups=video in the unit.
u $SERVICE_USER - "GenCLIP Inspect" $STATE_DIR -
EOF
    install_file 0644 "$tmp" "$(r "$SYSUSERS_FILE")"
}

write_tmpfiles() {
    local tmp="$WORK/tmpfiles.conf"
    cat >"$tmp" <<EOF
# GenCLIP Inspect (deploy/install.sh): owners and modes of its directories. install.sh sets them
# when it installs into /; a tree staged with --root gets them from here (systemd-tmpfiles --create).
# /var/lib/genclip is also the units' StateDirectory=: systemd hands it to genclip on every start.
d $CONF_DIR 0750 root $SERVICE_USER -
z $CONF_DIR/*.toml 0640 root $SERVICE_USER -
z $CONF_DIR/*.env 0640 root $SERVICE_USER -
d $CRED_DIR 0700 root root -
Z $CRED_DIR - root root -
d $STATE_DIR 0750 $SERVICE_USER $SERVICE_USER -
d $STATE_DIR/prompts 0750 $SERVICE_USER $SERVICE_USER -
d $STATE_DIR/profiles 0750 $SERVICE_USER $SERVICE_USER -
d $STATE_DIR/reference 0750 $SERVICE_USER $SERVICE_USER -
d $STATE_DIR/runs 0750 $SERVICE_USER $SERVICE_USER -
d $STATE_DIR/hf-cache 0750 $SERVICE_USER $SERVICE_USER -
d $STATE_DIR/weights 0750 $SERVICE_USER $SERVICE_USER -
# Recursively (modes unchanged): systemd's StateDirectory= chown skips the tree when its top is right.
Z $STATE_DIR - $SERVICE_USER $SERVICE_USER -
EOF
    install_file 0644 "$tmp" "$(r "$TMPFILES_FILE")"
}

ensure_user() {
    live || return 0
    if getent passwd "$SERVICE_USER" >/dev/null; then
        return 0
    fi
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$SYSUSERS_FILE"
    else
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "GenCLIP Inspect" "$SERVICE_USER"
    fi
    getent passwd "$SERVICE_USER" >/dev/null || die "could not create the user $SERVICE_USER"
    say "created the system user $SERVICE_USER"
}

make_dirs() {
    local sub
    ensure_dir 0750 root "$SERVICE_USER" "$(r "$CONF_DIR")"
    ensure_dir 0700 root root "$(r "$CRED_DIR")"
    chmod 0700 "$(r "$CRED_DIR")" # secrets: never looser, whatever happened to it
    ensure_dir 0750 "$SERVICE_USER" "$SERVICE_USER" "$(r "$STATE_DIR")"
    for sub in prompts profiles reference runs hf-cache weights; do
        ensure_dir 0750 "$SERVICE_USER" "$SERVICE_USER" "$(r "$STATE_DIR/$sub")"
    done
}

# The venv is built beside the current one (PREFIX/venv.new), made to work at PREFIX/venv, and
# swapped in only once pip succeeded: a failed upgrade leaves the running line's venv untouched.
build_venv() {
    local venv staged final src site
    venv="$(r "$PREFIX/venv")"
    staged="$venv.new"
    STAGED="$staged"
    final="$PREFIX/venv"
    rm -rf "$staged" "$venv.old"
    mkdir -p "$(dirname "$venv")"
    say "building $final with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$PYTHON" -m venv "$staged"
    # Build from a clean copy: pip would otherwise write build/ and *.egg-info into the checkout.
    src="$WORK/src"
    mkdir -p "$src"
    (cd "$REPO_DIR" && tar --exclude=__pycache__ --exclude='*.egg-info' -cf - \
        pyproject.toml README.md agent model trainer cli synthetic) |
        tar -C "$src" -xf -
    local pip=("$staged/bin/python" -m pip install --quiet --no-compile)
    if [[ -n "$CONSTRAINTS" ]]; then
        [[ -f "$CONSTRAINTS" ]] || die "constraints file not found: $CONSTRAINTS (or --no-constraints)"
        pip+=(-c "$CONSTRAINTS")
    fi
    # shellcheck disable=SC2206 # --pip-args is word-split on purpose
    [[ -z "$PIP_ARGS" ]] || pip+=($PIP_ARGS)
    "${pip[@]}" "$src${EXTRAS:+[$EXTRAS]}" || die "pip install failed; $venv is unchanged"
    "$PYTHON" "$HELPER" relocate --venv "$staged" --from "$staged" --to "$final" >/dev/null
    # Byte-code now, naming the final paths in tracebacks: the service cannot write PREFIX later
    # (ProtectSystem=strict). checked-hash: still valid after the staged tree is copied elsewhere.
    # Some packages ship files that are not meant to compile (torch's Python 3.12 test helpers):
    # skipped silently, as pip does.
    site="$("$staged/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    "$staged/bin/python" -m compileall -qq -f -j 0 --invalidation-mode checked-hash \
        -s "$staged" -p "$final" "$site" || true
    "$staged/bin/python" -I -c 'import cli.main, agent, model, trainer, synthetic' 2>/dev/null ||
        [[ " $PIP_ARGS " == *" --no-deps "* ]] || die "the new venv cannot import genclip; $venv is unchanged"
    # The service runs it as genclip: an interpreter in a place genclip cannot read (pyenv under
    # /root) would only show at `systemctl start`.
    if live && command -v runuser >/dev/null 2>&1 &&
        ! runuser -u "$SERVICE_USER" -- "$staged/bin/python" -I -c pass 2>/dev/null; then
        die "the user $SERVICE_USER cannot run $(readlink -f "$staged/bin/python") (the venv's interpreter);" \
            "install again with --python /usr/bin/python3.11; $venv is unchanged"
    fi
    if [[ -d "$venv" ]]; then
        mv "$venv" "$venv.old"
    fi
    mv "$staged" "$venv"
    STAGED=""
    rm -rf "$venv.old"
    [[ -x "$venv/bin/genclip" ]] || die "$final/bin/genclip missing after pip install"
    say "installed $final ($("$venv/bin/python" -c 'from importlib.metadata import version; print("genclip-inspect", version("genclip-inspect"))'))"
}

install_units() {
    local unit tmp
    for unit in "${UNITS[@]}"; do
        tmp="$WORK/$unit"
        sed "s|$SHIPPED_PREFIX/|$PREFIX/|g" "$REPO_DIR/deploy/systemd/$unit" >"$tmp"
        install_file 0644 "$tmp" "$(r "$UNIT_DIR/$unit")"
    done
}

configure_line() {
    local line="$1" config cred name sub
    config="$(r "$CONF_DIR/$line.toml")"
    "$PYTHON" "$HELPER" line-config --line "$line" --template "$REPO_DIR/config.toml" --out "$config" |
        sed 's/^/install.sh: /'
    if live; then
        chown "root:$SERVICE_USER" "$config"
    fi
    cred="$(r "$CRED_DIR/$line")"
    ensure_dir 0700 root root "$cred"
    for name in mqtt-password redis-password opcua-users page-token page-password; do
        if [[ ! -e "$cred/$name" ]]; then
            (umask 077 && : >"$cred/$name")
            say "created $cred/$name (empty: no password)"
        fi
    done
    opcua_certificate "$line" "$cred"
    for sub in prompts profiles reference runs; do
        ensure_dir 0750 "$SERVICE_USER" "$SERVICE_USER" "$(r "$STATE_DIR/$sub/$line")"
    done
}

# The OPC UA server's certificate ([opcua], docs/integration.md#opc-ua): self-signed, RSA 2048, SHA-256, the
# line's application URI and this host's name in subjectAltName, the key usages OPC UA asks for. Made once per
# line (kept on upgrades). Without openssl the files are left empty: `genclip opcua cert` makes them later.
opcua_certificate() {
    local line="$1" cred="$2" host
    [[ -s "$cred/opcua-cert" && -s "$cred/opcua-key" ]] && return 0
    host="$(hostname -f 2>/dev/null || hostname)"
    if command -v openssl >/dev/null 2>&1 &&
        (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
            -keyout "$cred/opcua-key" -out "$cred/opcua-cert" -outform DER \
            -subj "/CN=GenCLIP Inspect $line" \
            -addext "subjectAltName=URI:urn:genclip-inspect:$line,DNS:$host" \
            -addext "basicConstraints=critical,CA:FALSE" \
            -addext "keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment" \
            -addext "extendedKeyUsage=serverAuth,clientAuth" 2>/dev/null); then
        say "created $cred/opcua-cert and opcua-key (OPC UA server certificate, urn:genclip-inspect:$line)"
    else
        (umask 077 && : >"$cred/opcua-cert" && : >"$cred/opcua-key")
        say "openssl not found: $cred/opcua-cert and opcua-key left empty (genclip opcua cert makes them)"
    fi
}

daemon_reload() {
    if systemd_running; then
        systemctl daemon-reload
        say "systemctl daemon-reload"
    elif live; then
        say "systemd is not running here: no daemon-reload"
    fi
}

next_steps() {
    local lines=("${LINES[@]}") line first
    if ((${#lines[@]} == 0)); then
        for line in "$(r "$CONF_DIR")"/*.toml; do
            [[ -f "$line" ]] && lines+=("$(basename "$line" .toml)")
        done
    fi
    first="${lines[0]:-line-1}"
    echo
    if ! live; then
        cat <<EOF
Staged under $ROOT. On the target machine, after copying the tree to /:
  systemd-sysusers genclip.conf && systemd-tmpfiles --create genclip.conf && systemctl daemon-reload
and then the steps below.
EOF
    fi
    ((${#lines[@]} > 0)) || echo "No line configured yet: run again with --line NAME (e.g. --line line-1)."
    cat <<EOF
Next steps (docs/deploy.md):
  1. Put CLIP's weights on this machine ($STATE_DIR/weights/ or $STATE_DIR/hf-cache/).
  2. Edit $CONF_DIR/$first.toml (cameras, brokers, [model]); passwords, if any, into
     $CRED_DIR/$first/mqtt-password and redis-password; the live page's login into page-token
     (or [page].username and page-password). Check it:
       sudo -u $SERVICE_USER $PREFIX/venv/bin/genclip config check --config $CONF_DIR/$first.toml --model
  3. Start the line:   systemctl enable --now genclip@$first
     Weekly training:  systemctl enable --now genclip-train@$first.timer   (needs [trainer] data)
EOF
}

# --- uninstall -------------------------------------------------------------------------------------

# rmdir DIR and its parents while empty, never ROOT itself (staging trees only).
prune_empty() {
    local dir="$1"
    live && return 0
    while [[ "$dir" == "$ROOT"/* ]]; do
        if [[ -d "$dir" ]]; then
            rmdir "$dir" 2>/dev/null || return 0
        fi
        dir="$(dirname "$dir")"
    done
}

uninstall() {
    local unit venv dir
    if systemd_running; then
        systemctl stop 'genclip-train@*.timer' 'genclip-train@*.service' 'genclip@*.service' || true
    fi
    # Instances enabled with `systemctl enable` are symlinks in /etc/systemd/system/*.wants/.
    if [[ -d "$(r /etc/systemd/system)" ]]; then
        find "$(r /etc/systemd/system)" -mindepth 2 -maxdepth 2 -type l -path '*.wants/*' \
            \( -name 'genclip@*' -o -name 'genclip-train@*' \) -print -delete | sed 's/^/install.sh: removed /'
    fi
    for unit in "${UNITS[@]}"; do
        if [[ -e "$(r "$UNIT_DIR/$unit")" ]]; then
            rm -f "$(r "$UNIT_DIR/$unit")"
            say "removed $(r "$UNIT_DIR/$unit")"
        fi
    done
    rm -f "$(r "$SYSUSERS_FILE")" "$(r "$TMPFILES_FILE")"
    venv="$(r "$PREFIX/venv")"
    if [[ -e "$venv" || -e "$venv.new" || -e "$venv.old" ]]; then
        rm -rf "$venv" "$venv.new" "$venv.old"
        say "removed $venv"
    fi
    rmdir "$(r "$PREFIX")" 2>/dev/null || true
    if ((PURGE)); then
        # Drop-ins made with `systemctl edit` belong to the units that are gone now.
        for dir in "$(r /etc/systemd/system)"/genclip@*.d "$(r /etc/systemd/system)"/genclip-train@*.d; do
            [[ -d "$dir" ]] && rm -rf "$dir"
        done
        for dir in "$(r "$CONF_DIR")" "$(r "$STATE_DIR")" "$(r "$CACHE_DIR")"; do
            if [[ -e "$dir" ]]; then
                rm -rf "$dir"
                say "removed $dir"
            fi
        done
        if live && getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER"
            say "deleted the user $SERVICE_USER"
        fi
        if live && getent group "$SERVICE_USER" >/dev/null; then
            groupdel "$SERVICE_USER" || true
        fi
    else
        say "kept $(r "$CONF_DIR") and $(r "$STATE_DIR") (remove them too with --uninstall --purge)"
    fi
    daemon_reload
    for dir in "$(r /etc/systemd/system)"/*.wants "$(r "$PREFIX")" "$(r "$UNIT_DIR")" "$(r /etc/systemd/system)" \
        "$(r "$(dirname "$SYSUSERS_FILE")")" "$(r "$(dirname "$TMPFILES_FILE")")" "$(r "$CONF_DIR")" \
        "$(r "$(dirname "$STATE_DIR")")" "$(r "$(dirname "$CACHE_DIR")")"; do
        prune_empty "$dir"
    done
}

# --- main ------------------------------------------------------------------------------------------

main() {
    parse_args "$@"
    umask 022
    if ((UNINSTALL)); then
        uninstall
        return 0
    fi
    check_python
    [[ -f "$HELPER" && -f "$REPO_DIR/config.toml" && -f "$REPO_DIR/pyproject.toml" ]] ||
        die "run install.sh from a complete checkout of GenCLIP Inspect ($REPO_DIR)"
    WORK="$(mktemp -d)"
    say "installing into ${ROOT} (prefix $PREFIX)"
    write_sysusers
    write_tmpfiles
    ensure_user
    make_dirs
    build_venv
    install_units
    local line
    for line in "${LINES[@]}"; do
        configure_line "$line"
    done
    daemon_reload
    next_steps
}

main "$@"
