import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_STACK = [
    "fastapi",
    "sqlalchemy",
    "psycopg",
    "uvicorn",
    "alembic",
    "sklearn",
    "aggregator",
    "api",
]

# Runs `python -m clients ARGS` with the server stack made unimportable
# (a None entry in sys.modules makes `import` raise ImportError), then lists
# which of those modules ended up loaded anyway.
BLOCKED_RUN = """
import runpy, sys
blocked = {blocked!r}
for name in blocked:
    sys.modules[name] = None
sys.argv = ["clients", *{args!r}]
try:
    runpy.run_module("clients", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    print("exit", exc.code)
print("loaded", [n for n in blocked if sys.modules.get(n) is not None])
"""


def run_blocked(*args: str) -> subprocess.CompletedProcess[str]:
    code = BLOCKED_RUN.format(blocked=SERVER_STACK, args=list(args))
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_runs_with_only_the_base_install_and_torch() -> None:
    done = run_blocked("--help")
    assert done.returncode == 0, done.stderr
    assert "--server" in done.stdout
    assert "--enrollment-token" in done.stdout
    assert "exit 0" in done.stdout
    assert "loaded []" in done.stdout


def test_missing_credentials_are_reported_without_a_traceback() -> None:
    done = run_blocked("--server", "http://127.0.0.1:9")
    assert "exit 1" in done.stdout
    assert "pass --token and --federation, or --enrollment-token" in done.stderr
    assert "Traceback" not in done.stderr
