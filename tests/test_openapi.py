"""The OpenAPI document: it lists exactly the routes of App.routes with
their scopes, is valid OpenAPI 3.1, is served at /openapi.json without a
key, equals docs/openapi.json, and a live server's replies match it
(schemathesis)."""

import json
import os
import re
import subprocess
import sys

import pytest

import offgrid
from conftest import ROOT, Server, need, run_cli

METHODS = ("get", "post", "put", "delete", "patch", "options", "head", "trace")


def app_routes():
    """{(METHOD, /path/{param}): scope} from App.routes."""
    config = offgrid.Config.load({}, env={"OFFGRID_HOME": "/nonexistent"})
    app = offgrid.App(config, store=offgrid.ModelStore("/nonexistent"), engine=object())
    out = {}
    for method, pattern, _name, scope in app._routes():
        path = re.sub(r"\(\?P<([a-z0-9_]+)>[^)]*\)", r"{\1}", pattern.pattern.strip("^$")).replace("\\", "")
        out[(method, path)] = scope
    return out


def documented(doc):
    """{(METHOD, /path/{param}): operation} from an OpenAPI document."""
    return {(method.upper(), path): op for path, item in doc["paths"].items()
            for method, op in item.items() if method in METHODS}


def read_doc_file():
    with open(os.path.join(ROOT, "docs", "openapi.json"), encoding="utf-8") as f:
        return json.load(f)


def test_every_route_is_documented_and_nothing_else():
    routes = set(app_routes())
    ops = set(documented(offgrid.openapi_document()))
    assert routes - ops == set(), "routes missing from openapi_document(): %s" % sorted(routes - ops)
    assert ops - routes == set(), "documented operations that are no route: %s" % sorted(ops - routes)


def test_every_operation_names_its_routes_scope():
    routes = app_routes()
    for key, op in documented(offgrid.openapi_document()).items():
        assert op["x-offgrid-scope"] == routes[key], key
        # A public operation needs no key; the others inherit bearer / x-api-key.
        assert (op.get("security") == []) == (routes[key] == "public"), key


def test_path_parameters_are_declared():
    doc = offgrid.openapi_document()
    for path, item in doc["paths"].items():
        names = set(re.findall(r"{([a-z0-9_]+)}", path))
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == declared, path


def test_errors_have_the_shape_of_their_api():
    doc = offgrid.openapi_document()
    for (method, path), op in documented(doc).items():
        want = "#/components/schemas/%s" % ("OllamaError" if path.startswith("/api/") else
                                            "AnthropicError" if path.startswith("/v1/messages") else "Error")
        errors = {status: r for status, r in op["responses"].items() if int(status) >= 400}
        assert errors, (method, path)
        for status, response in errors.items():
            assert response["content"]["application/json"]["schema"] == {"$ref": want}, (method, path, status)
        if op["x-offgrid-scope"] != "public":
            assert {"401", "403", "429"} <= set(errors), (method, path)
        if "application/json" in op.get("requestBody", {}).get("content", {}):
            assert {"400", "411", "413"} <= set(errors), (method, path)
        elif "requestBody" in op:  # an upload: no max_body_bytes, but a length and room on disk
            assert {"400", "411", "507"} <= set(errors), (method, path)


def test_streaming_operations_document_their_media_type():
    ops = documented(offgrid.openapi_document())
    for key in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
                ("POST", "/v1/messages")]:
        assert "text/event-stream" in ops[key]["responses"]["200"]["content"], key
    for key in [("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/pull")]:
        assert "application/x-ndjson" in ops[key]["responses"]["200"]["content"], key


def test_document_is_valid_openapi_3_1():
    need("openapi_spec_validator", "validating the OpenAPI document")
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
    doc = offgrid.openapi_document()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)
    # The validator can fail: a parameter "in" the body (OpenAPI 2) is refused.
    broken = json.loads(json.dumps(doc))
    broken["paths"]["/v1/models/{model_id}"]["parameters"][0]["in"] = "body"
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_docs_openapi_json_is_the_document():
    assert read_doc_file() == offgrid.openapi_document(), \
        "docs/openapi.json is stale: run `python offgrid.py openapi > docs/openapi.json`"


def test_openapi_command_prints_the_document(tmp_path):
    result = run_cli(["openapi"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == read_doc_file()


def test_served_document_needs_no_key(start_server, tmp_path):
    srv = start_server(models_dir=str(tmp_path / "models"), env={"OFFGRID_API_KEY": "sk-test-openapi"},
                       wait_model=False)
    status, doc, headers = srv.get("/openapi.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert doc == offgrid.openapi_document()
    assert srv.get("/v1/models")[0] == 401  # the rest still needs the key
    status, _, headers = srv.request("PUT", "/openapi.json")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_standard_methods_no_route_takes_are_405_not_501(start_server, tmp_path):
    srv = start_server(models_dir=str(tmp_path / "models"), wait_model=False)
    for method in ("OPTIONS", "TRACE"):
        status, body, headers = srv.request(method, "/v1/models")
        assert status == 405 and headers["Allow"] == "GET, HEAD", (method, status, body)
        assert body["error"]["code"] == "method_not_allowed"


def test_unhashable_role_is_a_400_naming_it(start_server, tmp_path):
    # Found by schemathesis: a role that is an object was a 500 (TypeError).
    srv = start_server(models_dir=str(tmp_path / "models"), wait_model=False)
    status, body, _ = srv.post("/v1/chat/completions", {"messages": [{"role": {}, "content": "hi"}]})
    assert status == 400 and body["error"]["param"] == "messages[0].role", body
    status, body, _ = srv.post("/api/chat", {"model": "x", "messages": [{"role": [], "content": "hi"}]})
    assert status == 400 and body == {"error": body["error"]} and "role" in body["error"], body


# Operations schemathesis must not call on the shared model store: removing
# the model, or starting downloads from the internet.
# Making models changes the store too (variants, copies, blobs, quantized files).
DESTRUCTIVE = ("delete_model", "ollama_delete", "start_download", "ollama_pull", "verify_model",
               "ollama_create", "ollama_copy", "ollama_blob_upload", "start_quantize")
# Operations that read or write any folder they are given: made-up paths
# such as "/" would walk or write this machine's own disk. Their input
# checks are tested in test_usb.py with paths of the test's own.
FILESYSTEM = ("import_models", "export_models")
# QUERY is a draft method http.server does not know: 501 is the right answer
# (RFC 9110 15.6.2), so schemathesis is not asked to try it.
SCHEMATHESIS_CONFIG = """\
[phases.coverage]
unexpected-methods = ["get", "put", "post", "delete", "options", "patch", "trace"]
"""


# Operations whose cost grows with the input: the coverage phase would send
# each an array at its maxItems (2048 texts, one decode each: minutes on a
# small CPU), so they get the examples and fuzzing phases only.
HEAVY = ("embeddings", "ollama_embed")


def schemathesis(url, tmp_path, operations, max_examples, phases="examples,coverage,fuzzing"):
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    cli = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    cmd = [cli, "--config-file", str(config), "run", url + "/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--phases", phases, "--max-examples", str(max_examples), "--seed", "1",
           "--workers", "1", "--request-timeout", "120", "--suppress-health-check", "all",
           "--include-operation-id-regex", "^(%s)$" % "|".join(operations), "--output-truncate", "false"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))


@pytest.mark.slow
@pytest.mark.model
def test_live_server_replies_match_the_document(tmp_path, model_store):
    need("llama_cpp", "inference")
    need("schemathesis", "checking the live server against its OpenAPI document")
    ops = [op["operationId"] for op in documented(offgrid.openapi_document()).values()
           if op["operationId"] not in DESTRUCTIVE + FILESYSTEM + HEAVY]
    srv = Server(tmp_path / "home", model_store,
                 env={"OFFGRID_MAX_TOKENS_LIMIT": "8", "OFFGRID_DEFAULT_MAX_TOKENS": "8"})
    try:
        result = schemathesis(srv.url, tmp_path, ops, max_examples=20)
        heavy = schemathesis(srv.url, tmp_path, HEAVY, max_examples=10, phases="examples,fuzzing")
    finally:
        code = srv.stop()
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    assert "Tested: %d" % len(ops) in result.stdout, result.stdout[-3000:]
    assert heavy.returncode == 0, heavy.stdout[-12000:] + heavy.stderr[-3000:]
    assert "Tested: %d" % len(HEAVY) in heavy.stdout, heavy.stdout[-3000:]
    assert code == 0, srv.output()[-3000:]


@pytest.mark.slow
def test_removing_and_downloading_match_the_document(tmp_path, make_gguf):
    """The destructive operations, on a server of their own: a store holding
    one small model and no network (mirrors and catalog URLs never reached
    for ids schemathesis makes up, which the catalog does not hold)."""
    need("schemathesis", "checking the live server against its OpenAPI document")
    models = tmp_path / "models"
    models.mkdir()
    os.replace(make_gguf("tiny.gguf"), str(models / "tiny.gguf"))
    srv = Server(tmp_path / "home", str(models), env={"OFFGRID_MIRRORS": "http://127.0.0.1:9"}, wait_model=False)
    try:
        result = schemathesis(srv.url, tmp_path, DESTRUCTIVE, max_examples=10)
    finally:
        srv.stop()
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    assert "Tested: %d" % len(DESTRUCTIVE) in result.stdout, result.stdout[-3000:]
