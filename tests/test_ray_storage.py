"""A Ray job whose input and output are on S3 (moto's S3 server stands in for it), as on a cluster
without a shared filesystem (pip install 'pagedlm[ray]'; the test extra brings moto)."""

import json

import pytest

moto_server = pytest.importorskip("moto.server")
ray = pytest.importorskip("ray")

from pagedlm.entrypoints.cli import run_main  # noqa: E402

ROWS = [*({"id": i, "prompt": f"Hello {i}"} for i in range(6)), {"id": None, "prompt": "no id"},
        {"id": 9, "prompt": "x", "sampling_params": {"temperature": -1.0}}]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A bucket on a local S3 server, with the environment that pyarrow (and so Ray's readers,
    writers and actors, started after it) finds it by."""
    import pyarrow.fs as pa_fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    mp = pytest.MonkeyPatch()
    endpoint = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
    for name, value in dict(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                            AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true").items():
        mp.setenv(name, value)
    fs = pa_fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
    fs.create_dir("jobs")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield fs
    ray.shutdown()
    mp.undo()
    server.stop()


def _files(fs, directory: str) -> list[str]:
    import pyarrow.fs as pa_fs

    return sorted(i.path for i in fs.get_file_info(pa_fs.FileSelector(directory)) if i.path.endswith(".parquet"))


def _rows(fs, files: list[str]) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in files for row in pq.read_table(path, filesystem=fs).to_pylist()]


def test_a_ray_job_reads_and_writes_s3_and_resumes_there(s3, llama_dir):
    import pyarrow.fs as pa_fs

    with s3.open_output_stream("jobs/in/rows.jsonl") as f:
        f.write("".join(json.dumps(row) + "\n" for row in ROWS).encode())
    args = ["--input", "s3://jobs/in/rows.jsonl", "--output", "s3://jobs/out.parquet", "--model", llama_dir, "--ray",
            "--num-actors", "1", "--threads-per-actor", "1", "--cpus-per-actor", "0.5", "--max-in-flight", "2",
            "--max-tokens", "3", "--temperature", "0", "--dtype", "float32", "--max-model-len", "128"]
    assert run_main(args) == 0
    rows = _rows(s3, _files(s3, "jobs/out.parquet"))
    ids = [str(i) for i in (0, 1, 2, 3, 4, 5, 9)]
    assert sorted(r["id"] for r in rows if r["id"] is not None) == ids
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {None, "9"} and "temperature" in errors["9"]
    first = {r["id"]: r["outputs"] for r in rows}
    assert json.loads(s3.open_input_stream("jobs/out.parquet.job.json").read())["input"] == "s3://jobs/in/rows.jsonl"
    summary = json.loads(s3.open_input_stream("jobs/out.parquet.summary.json").read())
    assert (summary["rows"], summary["completed"], summary["errors"], summary["skipped"]) == (8, 6, 2, 0)

    # As after a kill: one file's rows are lost and another file is torn; their rows run again.
    files = _files(s3, "jobs/out.parquet")
    assert len(files) >= 3
    s3.delete_file(files[0])
    with s3.open_output_stream(files[1]) as f:
        f.write(b"PAR1 torn")
    kept = _rows(s3, files[2:])
    with pytest.raises(SystemExit):  # a started job's output is not overwritten
        run_main(args)
    assert run_main(args + ["--resume"]) == 0
    assert s3.get_file_info(files[1] + ".damaged").type == pa_fs.FileType.File
    resumed = _rows(s3, _files(s3, "jobs/out.parquet"))
    assert sorted(r["id"] for r in resumed if r["id"] is not None) == ids  # each id once
    assert all(r["outputs"] == first[r["id"]] for r in resumed)
    summary = json.loads(s3.open_input_stream("jobs/out.parquet.summary.json").read())
    skipped = sum(r["id"] is not None for r in kept)  # a row without an id has no id to skip by: it runs again
    assert (summary["skipped"], summary["rows"]) == (skipped, skipped + len(resumed) - len(kept))
