"""Argo CD health checks (deploy/argocd/<group>/<Kind>/health.lua), run in a real Lua interpreter.

Argo CD runs health scripts with gopher-lua, a Lua 5.1 implementation, and opens only the
base, table and (a safe) os library for scripts configured in argocd-cm. `run_health`
reproduces that: Lua 5.1 through lupa, a global environment with exactly those libraries,
and no string methods, so a script that would fail in Argo CD fails here too. Each
`health_test.yaml` is in Argo CD's own format (tests: healthStatus + inputPath).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import lupa.lua51 as lua51
import pytest
import yaml

from kubetune_operator.api import adapterdeployment as adep_api
from kubetune_operator.api import finetunejob as ftj_api
from kubetune_operator.api import finetunesweep as fts_api
from kubetune_operator.api import load_adapterdeployment, load_finetunejob, load_finetunesweep

REPO = Path(__file__).resolve().parents[2]
CHECKS = REPO / "deploy" / "argocd" / "kubetune.io"
KINDS = ("FineTuneJob", "AdapterDeployment", "FineTuneSweep")
LOADERS = {
    "FineTuneJob": load_finetunejob,
    "AdapterDeployment": load_adapterdeployment,
    "FineTuneSweep": load_finetunesweep,
}
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

# Argo CD's VM: base library, table, and a safe os (time/date/clock); no string, math, io, debug.
_SANDBOX = """
local script, obj = ...
local env = {obj = obj, table = table, os = {time = os.time, date = os.date, clock = os.clock}}
for _, name in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "print", "rawequal",
    "rawget", "rawset", "select", "getmetatable", "setmetatable", "tonumber", "tostring", "type",
    "unpack", "xpcall", "_VERSION"}) do
  env[name] = _G[name]
end
env._G = env
getmetatable("").__index = nil  -- ("x"):upper() needs the string library
local chunk, err = loadstring(script, "=health.lua")
if chunk == nil then
  error(err)
end
setfenv(chunk, env)
return chunk()
"""


def run_health(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """Argo CD's verdict on `obj`, computed by deploy/argocd/kubetune.io/<kind>/health.lua."""
    script = (CHECKS / kind / "health.lua").read_text()
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    result = lua.execute(_SANDBOX, script, lua.table_from(obj, recursive=True))
    assert lua.eval("type")(result) == "table", f"{kind} health.lua returned {result!r}, not a table"
    out = dict(result.items())
    assert set(out) <= {"status", "message"}, out
    assert out.get("status") in ARGO_STATUSES, f"invalid Argo CD health status {out.get('status')!r}"
    return out


def cases(kind: str) -> list[tuple[str, dict[str, Any]]]:
    spec = yaml.safe_load((CHECKS / kind / "health_test.yaml").read_text())
    return [(t["inputPath"], t["healthStatus"]) for t in spec["tests"]]


ALL_CASES = [
    pytest.param(kind, path, want, id=f"{kind}:{path}") for kind in KINDS for path, want in cases(kind)
]


@pytest.mark.parametrize(("kind", "input_path", "want"), ALL_CASES)
def test_health_matches_health_test_yaml(kind: str, input_path: str, want: dict[str, str]) -> None:
    obj = yaml.safe_load((CHECKS / kind / input_path).read_text())
    assert run_health(kind, obj) == want


@pytest.mark.parametrize("kind", KINDS)
def test_testdata_are_valid_objects_of_the_api(kind: str) -> None:
    """The inputs have the status shape the operator writes (the API models validate status too)."""
    load = LOADERS[kind]
    for path, _ in cases(kind):
        obj = yaml.safe_load((CHECKS / kind / path).read_text())
        assert obj["kind"] == kind
        load(obj)


@pytest.mark.parametrize(
    ("kind", "phases"),
    [("FineTuneJob", ftj_api.Phase), ("AdapterDeployment", adep_api.Phase), ("FineTuneSweep", fts_api.Phase)],
)
def test_every_phase_of_the_api_has_a_test_case(kind: str, phases: Any) -> None:
    covered = {
        (yaml.safe_load((CHECKS / kind / path).read_text()).get("status") or {}).get("phase")
        for path, _ in cases(kind)
    }
    # AdapterDeployment's Pending is only ever written before the first reconcile finished.
    missing = set(get_args(phases)) - covered - ({"Pending"} if kind == "AdapterDeployment" else set())
    assert not missing, f"{kind} phases without a health test case: {missing}"


def test_unknown_phase_is_unknown_not_healthy() -> None:
    obj = yaml.safe_load((CHECKS / "FineTuneJob" / "testdata" / "succeeded.yaml").read_text())
    obj["status"]["phase"] = "Exploded"
    assert run_health("FineTuneJob", obj) == {"status": "Unknown", "message": "Unknown phase Exploded"}


def test_the_sandbox_refuses_what_argo_cd_refuses() -> None:
    """A script that needs the string library fails here, as it would in Argo CD."""
    lua = lua51.LuaRuntime()
    with pytest.raises(lua51.LuaError, match="string"):
        lua.execute(_SANDBOX, 'return {status = string.upper("healthy")}', lua.table_from({}))
    lua = lua51.LuaRuntime()
    with pytest.raises(lua51.LuaError, match="attempt to index a string value"):
        lua.execute(_SANDBOX, 'return {status = ("x"):upper()}', lua.table_from({}))


def test_argocd_cm_patch_carries_the_health_scripts_verbatim() -> None:
    patch = yaml.safe_load((REPO / "deploy" / "argocd" / "argocd-cm-patch.yaml").read_text())
    data = patch["data"]
    for kind in KINDS:
        assert (
            data[f"resource.customizations.health.kubetune.io_{kind}"]
            == (CHECKS / kind / "health.lua").read_text()
        )
