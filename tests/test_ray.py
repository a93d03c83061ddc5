"""pagedlm on Ray Data: a local two-actor cluster gives the local runner's rows (pip install 'pagedlm[ray]')."""

import json
import os

import pytest
import ray

from conftest import BOS
from pagedlm.entrypoints.cli import run_main
from pagedlm.entrypoints.jobs import ray_job
from pagedlm.entrypoints.jobs.runner import JobConfig, run_job
from pagedlm.integrations.ray import PagedLMProcessorConfig, build_processor

ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8}
SAMPLING = {"temperature": 0.0, "max_tokens": 4}
ROWS = [
    *({"id": i, "prompt": f"Hello {i}", "tag": f"t{i}"} for i in range(10)),
    {"id": 10, "prompt_token_ids": [BOS, 5, 6], "tag": "ids"},
    {"id": 11, "prompt_token_ids": [], "tag": "empty"},
    {"id": 12, "prompt": "x", "sampling_params": {"temperature": -1.0}, "tag": "bad"},
]


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows(llama_dir, tmp_path_factory) -> dict:
    """The local runner's output rows, by id: what the Ray runs must give."""
    tmp = tmp_path_factory.mktemp("ray_local")
    with open(tmp / "in.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ROWS)
    run_job(JobConfig(input=str(tmp / "in.jsonl"), output=str(tmp / "out.jsonl"), model=llama_dir,
                      engine=dict(ENGINE), sampling=dict(SAMPLING)), tty=False)
    with open(tmp / "out.jsonl") as f:
        return {row["id"]: row for row in map(json.loads, f)}


def _same_results(rows: list[dict], local: dict) -> None:
    assert sorted(row["id"] for row in rows) == sorted(local)
    for row in rows:
        expected = local[row["id"]]
        assert row["tag"] == expected["tag"]  # carried through
        assert (row["error"] is None) == (expected["error"] is None), row["error"]
        if row["error"] is None:
            assert [c["token_ids"] for c in row["outputs"]] == [c["token_ids"] for c in expected["outputs"]]
            assert row["prompt_tokens"] == expected["prompt_tokens"]


def test_processor_on_two_actors_equals_the_local_runner(local_cluster, llama_dir, local_rows):
    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=ENGINE, sampling_params=SAMPLING,
                                    concurrency=2, batch_size=4, num_cpus=0.5, torch_threads=1)
    rows = build_processor(config)(ray.data.from_items(ROWS)).take_all()
    _same_results(rows, local_rows)
    errors = {row["id"]: row["error"] for row in rows if row["error"]}
    assert set(errors) == {11, 12} and "empty" in errors[11] and "temperature" in errors[12]


def test_cli_on_ray_end_to_end_and_resume(local_cluster, llama_dir, local_rows, tmp_path):
    lines = [json.dumps(row) for row in ROWS] + ["{not json"]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", llama_dir, "--ray",
            "--num-actors", "2", "--threads-per-actor", "1", "--cpus-per-actor", "0.5", "--max-in-flight", "4",
            "--temperature", "0", "--max-tokens", "4", "--dtype", "float32", "--max-model-len", "128",
            "--max-num-seqs", "8"]
    assert run_main(args) == 0

    def output_rows():
        return [json.loads(line) for name in sorted(os.listdir(out)) if name.endswith(".jsonl")
                for line in (out / name).read_text().splitlines()]

    rows = output_rows()
    assert len(rows) == len(lines)
    bad_line = [row for row in rows if row["id"] is None]
    assert len(bad_line) == 1 and "not valid JSON" in bad_line[0]["error"]
    _same_results([row for row in rows if row["id"] is not None], local_rows)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert (summary["completed"], summary["errors"]) == (11, 3)

    # As after a kill: the rows of some files are lost; --resume runs those again, and only those.
    files = sorted(name for name in os.listdir(out) if name.endswith(".jsonl"))
    assert len(files) > 1
    lost = [json.loads(line)["id"] for line in (out / files[0]).read_text().splitlines()]
    os.unlink(out / files[0])
    assert run_main(args + ["--resume"]) == 0
    resumed = [row for row in output_rows() if row["id"] is not None]
    assert sorted(row["id"] for row in resumed) == sorted(local_rows)  # each id once
    _same_results(resumed, local_rows)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    lost_with_ids = len([i for i in lost if i is not None])
    # The bad line has no id to skip by: it runs again whichever file held it.
    assert summary["completed"] + summary["errors"] == lost_with_ids + 1
    assert summary["skipped"] == len(local_rows) - lost_with_ids and summary["rows"] == len(lines)


@pytest.mark.parametrize("extra, rows, message", [
    ([], [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}], "runs plain rows"),
    (["--model", "/nonexistent/model"], None, "does not exist"),
    (["--ray-address", "127.0.0.1:1"], None, "no Ray cluster answers"),
    (["--threads-per-actor", "0"], None, "--threads-per-actor must be a positive integer"),
    (["--dtype", "float99"], None, "engine_kwargs: dtype must be one of"),  # found by a hunt: failed in the actors
    (["--max-in-flight", "0"], None, "--max-in-flight must be a positive integer"),
    (["--cpus-per-actor", "100000"], None, "more than the"),  # found by a hunt: waited forever
    # Found by a hunt: actors holding every CPU left none for the read task, which waited forever.
    (["--num-actors", "100000"], None, "Ray's read and write tasks need one"),
    (["--gpu-memory-utilization", "1.5"], None, "gpu_memory_utilization must be None or a number in (0, 1]"),
    (["--progress-interval", "5"], None, "with --ray, Ray Data shows its own"),  # found by a hunt: ignored
    # A job's output as input: refused as the local runner refuses it (it ran every row as an error).
    ([], [{"id": 1, "prompt": "x", "outputs": [], "prompt_tokens": 1, "completion_tokens": 0, "error": None}],
     "is it a job's output"),
])
def test_cli_on_ray_refuses_before_ray_starts(llama_dir, tmp_path, capsys, extra, rows, message):
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows or ROWS[:2]) + "\n")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--ray", "--model", llama_dir,
            *extra]
    with pytest.raises(SystemExit):
        run_main(args)
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.job.json")


@pytest.mark.parametrize("flag", [["--threads-per-actor", "0"], ["--cpus-per-actor", "0"], ["--ray-address", ""],
                                  ["--num-actors", "1"], ["--num-actors", "3"]])
def test_ray_flags_without_ray_are_refused_whatever_their_value(llama_dir, tmp_path, capsys, flag):
    """Found by a hunt: 0, "" (and --num-actors 1, the default) were taken without --ray and ignored."""
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    with pytest.raises(SystemExit):
        run_main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--model", llama_dir,
                  *flag])
    assert "--ray-address, --num-actors, --threads-per-actor and --cpus-per-actor need --ray" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.jsonl")


def test_cli_on_ray_starts_a_local_instance_or_the_ray_address_cluster(llama_dir, tmp_path, capsys, monkeypatch):
    """A docs walkthrough: without --ray-address the job called ray.init(), which joined a cluster
    that `ray start` had left on the machine (and waited minutes on a stale record of one), where the
    docs say it starts a local instance; RAY_ADDRESS, which names a cluster on purpose, is taken and
    checked as --ray-address is."""
    import ray

    addresses = []

    def init(address=None, **kwargs):
        addresses.append(address)
        raise RuntimeError("not started here")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process that has not joined Ray
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--ray", "--model", llama_dir]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match="not started here"):
        run_main(args)
    assert addresses == ["local"]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(SystemExit):
        run_main(args + ["--output", str(tmp_path / "out2")])
    assert "RAY_ADDRESS '127.0.0.1:1': no Ray cluster answers there" in capsys.readouterr().err
    assert addresses == ["local"]


def test_cli_on_ray_refuses_a_job_another_run_writes(llama_dir, tmp_path, capsys):
    """Found by a hunt: the Ray driver took no OUT.lock, so a requeued second run of the job wrote
    its rows again beside the first's."""
    from pagedlm.entrypoints.jobs.runner import exclusive_run

    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--ray", "--model", llama_dir]
    with exclusive_run(str(tmp_path / "out")), pytest.raises(SystemExit):
        run_main(args)
    assert "another run of this job is writing it" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.job.json")


def test_json_rows_of_changing_types_to_parquet_on_ray(local_cluster, llama_dir, tmp_path):
    import pyarrow.parquet as pq

    rows = [{"id": 1, "prompt": "a", "x": 1}, {"id": "two", "prompt": "b", "x": "text"}, {"id": 10.5, "prompt": "c"},
            {"id": 3, "messages": "not a list"}, {"id": 4, "prompt": "d", "x": [1, {"k": None}], "\ud800": 2}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.parquet"
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", llama_dir, "--ray",
            "--num-actors", "1", "--threads-per-actor", "1", "--cpus-per-actor", "0.5", "--max-in-flight", "2",
            "--max-tokens", "2", "--dtype", "float32", "--max-model-len", "128"]
    assert run_main(args) == 0
    # Found by a hunt: each batch wrote its own rows' fields, and readers that take the first
    # file's schema (pandas, pyarrow datasets) lost the others ("messages" here).
    schemas = {pq.read_schema(path).to_string() for path in out.glob("*.parquet")}
    assert len(schemas) == 1 and "messages" in schemas.pop()
    got = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert got["3"]["messages"] == "not a list" and got["1"]["messages"] is None
    assert set(got) == {"1", "two", None, "3", "4"}  # ids as text; an unusable id is null
    assert got["1"]["x"] == "1" and got["two"]["x"] == "text" and got["4"]["x"] == '[1, {"k": null}]'
    assert got["4"]["\\ud800"] == "2"  # a key with a lone surrogate is its escape (a hunt: it failed the job)
    assert got["1"]["error"] is None and "a conversation must be a list" in got["3"]["error"]
    assert "got 10.5" in got[None]["error"]


def test_rows_as_ray_holds_them(local_cluster, llama_dir):
    """Found by a hunt: a tensor column (numpy arrays) failed the dataset when a row's error quoted
    it, tensor token ids were refused, and a per-row logit_bias met the other rows' keys as nulls
    (Arrow unifies structs)."""
    import numpy as np

    rows = [{"id": 1, "prompt_token_ids": np.array([BOS, 5, 6]), "emb": np.zeros(3), "sampling_params": {"logit_bias": {"5": 2.0}}},
            {"id": 2, "prompt": "Hi", "emb": np.ones(3), "sampling_params": {"logit_bias": {"7": -2.0}}},
            {"id": None, "prompt": "Hi", "emb": np.ones(3), "sampling_params": {"logit_bias": {"7": -2.0}}}]
    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=ENGINE, sampling_params=SAMPLING,
                                    concurrency=1, batch_size=4, num_cpus=0.5, torch_threads=1)
    got = {row["id"]: row for row in build_processor(config)(ray.data.from_items(rows)).take_all()}
    assert got[1]["error"] is None and got[1]["prompt_tokens"] == 3 and got[2]["error"] is None
    assert "id must be a string or an integer" in got[None]["error"]


def test_tensor_columns_come_back_as_lists_of_one_type(local_cluster, llama_dir):
    """Found by a hunt: numpy columns of unequal lengths (a tokenizing preprocess) came back as JSON
    text, and equal-length batches as Ray's tensor type: pandas and Parquet could not join them."""
    import numpy as np

    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=ENGINE, sampling_params=SAMPLING,
                                    concurrency=1, batch_size=2, num_cpus=0.5, torch_threads=1)
    lengths = [2, 3, 4, 4]  # batches of unequal and of equal lengths
    processor = build_processor(config, preprocess=lambda row: {
        "id": row["item"], "prompt_token_ids": np.arange(BOS, BOS + lengths[row["item"]]),
        "emb": np.ones((2, lengths[row["item"]]), np.float32)})
    frame = processor(ray.data.from_items(list(range(4)))).to_pandas()
    for row in frame.itertuples():
        n = lengths[row.id]
        assert list(row.prompt_token_ids) == list(range(BOS, BOS + n)) and row.prompt_tokens == n
        assert [list(r) for r in row.emb] == [[1.0] * n] * 2
    assert frame["error"].isna().all()


def test_actor_threads_default_to_the_cpus_it_reserves():
    """Found by a hunt: the docs said all the node's cores; Ray's OMP_NUM_THREADS gave num_cpus."""
    assert PagedLMProcessorConfig().threads == 1
    assert PagedLMProcessorConfig(num_cpus=2.5).threads == 2 and PagedLMProcessorConfig(num_cpus=0.5).threads == 1
    assert PagedLMProcessorConfig(num_cpus=2, torch_threads=3).threads == 3
    assert PagedLMProcessorConfig(concurrency=(1, 3), num_cpus=2).reserved_cpus == 6
    with pytest.raises(ValueError, match="num_cpus must be a finite number > 0"):
        PagedLMProcessorConfig(num_cpus=0)


def test_parquet_input_as_written_whatever_its_directory_or_suffix(local_cluster, llama_dir, tmp_path):
    """Found by a hunt: a directory named like a hive partition ("prompt=x") replaced every row's
    prompt, and a ``.pq`` input was not found."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prompt=x" / "in.pq"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": 1, "prompt": "a"}, {"id": 2, "prompt": None}]), path)
    out = tmp_path / "out.jsonl"
    args = ["--input", str(path), "--output", str(out), "--model", llama_dir, "--ray", "--num-actors", "1",
            "--threads-per-actor", "1", "--cpus-per-actor", "0.5", "--max-tokens", "2", "--dtype", "float32",
            "--max-model-len", "128"]
    assert run_main(args) == 0
    got = {}
    for name in os.listdir(out):
        with open(out / name) as f:
            got.update((row["id"], row) for row in map(json.loads, f))
    assert got[1]["prompt"] == "a" and got[1]["error"] is None and got[2]["prompt"] is None and got[2]["error"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_directory_of_shards_is_one_input_on_ray(local_cluster, llama_dir, tmp_path, suffix, monkeypatch):
    """As a local job reads one: its files of one type, hidden ones (Spark's _SUCCESS) left out,
    listed once (a shard added after the first listing is not read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pagedlm.entrypoints.jobs import storage

    shards = tmp_path / "shards"
    shards.mkdir()
    for i, rows in enumerate([[{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}], [{"id": 3, "prompt": "c"}]]):
        if suffix == ".jsonl":
            (shards / f"part-{i}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            pq.write_table(pa.Table.from_pylist(rows), shards / f"part-{i}.parquet")
    (shards / "_SUCCESS").write_text("not a row")
    listings, list_files = [], storage.list_files

    def list_then_add_a_shard(directory, suffixes):  # the output's files are listed too
        found = list_files(directory, suffixes)
        if directory == str(shards):
            listings.append(directory)
            (shards / f"part-9{suffix}").write_bytes((shards / f"part-1{suffix}").read_bytes())
        return found

    monkeypatch.setattr(storage, "list_files", list_then_add_a_shard)
    out = tmp_path / "out.jsonl"
    args = ["--input", str(shards), "--output", str(out), "--model", llama_dir, "--ray", "--num-actors", "1",
            "--threads-per-actor", "1", "--cpus-per-actor", "0.5", "--max-tokens", "2", "--dtype", "float32",
            "--max-model-len", "128"]
    assert run_main(args) == 0
    rows = [json.loads(line) for name in os.listdir(out) for line in (out / name).read_text().splitlines()]
    assert sorted((row["id"], row["error"]) for row in rows) == [(1, None), (2, None), (3, None)]
    assert listings == [str(shards)]


def test_json_lines_split_on_newlines_only_and_a_bad_line_is_its_row(local_cluster, llama_dir, tmp_path):
    """Found by a hunt: read_text split rows at a U+2028 inside a JSON string (rows lost) and one
    line of bad UTF-8 failed the job."""
    lines = [b"\xef\xbb\xbf", json.dumps({"id": 1, "prompt": "a\u2028b\u0085c"}, ensure_ascii=False).encode(),
             b'{"id": 2, "prompt": "\xff"}', b" \r", json.dumps({"id": 3, "prompt": "d"}).encode()]  # blank: no rows
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", llama_dir, "--ray", "--num-actors", "1",
            "--threads-per-actor", "1", "--cpus-per-actor", "0.5", "--max-tokens", "2", "--dtype", "float32",
            "--max-model-len", "128"]
    assert run_main(args) == 0
    rows = [json.loads(line) for name in os.listdir(out) for line in open(out / name, encoding="utf-8")]
    assert sorted((r["id"], r["error"] is None) for r in rows if r["id"] is not None) == [(1, True), (3, True)]
    assert [r["id"] for r in rows if r["error"]] == [None] and len(rows) == 3
    assert next(r for r in rows if r["error"])["error"].endswith("a line is not UTF-8 (byte 0xff at byte 22): save the "
                                                                 "file as UTF-8")
    assert next(r for r in rows if r["id"] == 1)["prompt"] == "a\u2028b\u0085c"


def test_resume_on_ray_reads_output_files_with_blank_lines(tmp_path):
    """A blank line in an output file made it 'damaged': moved aside and its rows run again (a
    review; the local resume skips them)."""
    from pagedlm.entrypoints.jobs.ray_job import _earlier_ids

    (tmp_path / "a.jsonl").write_bytes(b'{"id": 1}\n\n{"id": 2}\r\n \n')
    (tmp_path / "b.jsonl").write_bytes(b'{"id": 3}\n{"id": 4, "te')  # torn by a kill
    assert _earlier_ids(str(tmp_path), "jsonl") == {str(tmp_path / "a.jsonl"): [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl.damaged"]


@pytest.mark.parametrize("concurrency", [0, (2, 1), (0, 2), (1, 2, 3), 1.5, (1, "2")])
def test_processor_config_refuses_a_bad_concurrency(concurrency):
    with pytest.raises(ValueError, match=r"concurrency must be a positive integer or a pair \(m, n\)"):
        PagedLMProcessorConfig(concurrency=concurrency)


@pytest.mark.parametrize("fields, message", [  # found by a hunt: accepted, then ignored or failing in the actors
    ({"model_source": ""}, "model_source must be a checkpoint directory"),
    ({"num_gpus": -1}, "num_gpus must be a finite number >= 0, got -1"),
    ({"num_gpus": "1"}, "num_gpus must be a finite number >= 0, got '1'"),
    # found by a hunt: taken, and the dataset would wait forever for such an actor
    ({"num_gpus": float("inf")}, "num_gpus must be a finite number >= 0, got inf"),
    ({"num_cpus": float("inf")}, "num_cpus must be a finite number > 0, got inf"),
    ({"num_cpus": True}, "num_cpus must be a finite number > 0, got True"),
    # found by a hunt: 4 GPUs reserved an actor, one used; a GPU reserved for a CPU engine
    ({"num_gpus": 4}, r"num_gpus must be at most 1 \(an actor's LLM runs on one device"),
    ({"num_gpus": 1, "engine_kwargs": {"device": "cpu"}}, "num_gpus=1 reserves a GPU for actors whose engine_kwargs "
                                                          "device is 'cpu'"),
    ({"sampling_params": {"max_tokens": 0}}, "sampling_params: max_tokens must be"),
    # found by a hunt: every actor's LLM refused it, and the dataset failed with ActorDiedError
    ({"model_source": "/no/such/model"}, "model_source '/no/such/model' does not exist here, and is no Hugging Face"),
])
def test_processor_config_refuses_bad_fields_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        PagedLMProcessorConfig(**fields)


def test_local_paths_reach_the_actors_absolute(llama_dir, tmp_path, monkeypatch):
    """A hunt: the workers of a cluster that `ray start` began open paths from their own working
    directory: a relative --input failed Ray's read, a relative --output lost every row at the write,
    a relative --chat-template file killed every actor. The driver makes them absolute."""
    from pagedlm.entrypoints.jobs.runner import JobConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs={"chat_template": "t.jinja",
                                                                           "generation_config": "vllm"})
    assert config.engine_kwargs == {"chat_template": str(tmp_path / "t.jinja"), "generation_config": "vllm"}
    (tmp_path / "in.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    seen = []
    monkeypatch.setattr(ray_job, "_run_ray_locked", lambda config, *args: seen.append(config) or (None, None))
    ray_job.run_ray_job(JobConfig(input="in.jsonl", output="out", model=llama_dir))
    assert (seen[0].input, seen[0].output) == (str(tmp_path / "in.jsonl"), str(tmp_path / "out"))


def test_processor_config_checks_engine_values_against_the_default_model_too():
    """Found by a hunt: without model_source (the embedded model) a bad value was left to the actors."""
    with pytest.raises(ValueError, match="engine_kwargs: block_size must be 8, 16 or 32, got 64"):
        PagedLMProcessorConfig(engine_kwargs={"block_size": 64})
    PagedLMProcessorConfig(engine_kwargs={"enforce_eager": True})  # vLLM's arguments at their honoured values


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda0", 0])
def test_processor_config_refuses_a_device_no_machine_has(llama_dir, tmp_path, device):
    """Found by a hunt: a device name no machine has was left to the actors, which all died; the
    CLI had written the job's record by then, so a corrected rerun was refused. Whether the actors'
    machines have a valid device is theirs to say."""
    with pytest.raises(ValueError, match=r"engine_kwargs: device must be 'auto', 'cpu' or 'cuda\[:N\]'"):
        PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs={"device": device})
    (tmp_path / "in.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ValueError, match="engine_kwargs: device must be"):
        ray_job.run_ray_job(JobConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), model=llama_dir,
                                      engine={"device": device}))
    assert os.listdir(tmp_path) == ["in.jsonl"]
    assert PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs={"device": "cuda:3"})  # maybe there


def test_processor_config_fields_set_after_construction_are_checked_by_build_processor(llama_dir, tmp_path,
                                                                                        monkeypatch):
    """Found by a hunt: batch_size 0, a relative model_source (which actors open from their own
    working directory) set after construction reached the actors unchecked."""
    config = PagedLMProcessorConfig(model_source=llama_dir)
    config.batch_size = 0
    with pytest.raises(ValueError, match="batch_size"):
        build_processor(config)
    monkeypatch.chdir(os.path.dirname(llama_dir))
    config = PagedLMProcessorConfig(model_source=llama_dir)
    config.model_source = os.path.basename(llama_dir)
    assert build_processor(config).config.model_source == llama_dir


def test_processor_config_does_not_download_the_default_model(tmp_path, monkeypatch):
    """Found by a review: a driver that runs no inference (and may be offline) fetched it to check values."""
    import pagedlm.transformers_utils.gguf as gguf

    monkeypatch.setenv("PAGEDLM_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf, "_fetch_default_gguf", lambda dest: pytest.fail("downloaded"))
    assert gguf.default_model_path(download=False) is None
    PagedLMProcessorConfig(engine_kwargs={"block_size": 64})  # checked by the actors instead


def test_preprocess_and_postprocess_as_ray_data_llm(local_cluster, llama_dir):
    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=ENGINE, sampling_params=SAMPLING,
                                    concurrency=(1, 2), batch_size=4, num_cpus=0.5, torch_threads=1)  # autoscaling
    processor = build_processor(config, preprocess=lambda row: {"id": row["n"], "prompt": f"Hello {row['n']}"},
                                postprocess=lambda row: {"n": row["id"], "answer": row["outputs"][0]["text"]})
    rows = processor(ray.data.from_items([{"n": 1}, {"n": 2}])).take_all()
    assert sorted(r["n"] for r in rows) == [1, 2] and all(isinstance(r["answer"], str) for r in rows)
    # Found by a hunt: preprocess replaced the row (Ray Data LLM merges its output: the input's
    # columns reach postprocess), and postprocess ran on error rows (Ray Data LLM's pass it by),
    # where outputs[0] failed the whole dataset. The input's prompt of another kind gives way.
    processor = build_processor(
        config,
        preprocess=lambda row: {"id": row["n"], "prompt_token_ids": [BOS, 5, len(row["prompt"])],
                                "sampling_params": {"temperature": row["t"]}},
        postprocess=lambda row: {"n": row["id"], "user": row["user"], "answer": row["outputs"][0]["text"]})
    rows = processor(ray.data.from_items([{"n": 1, "user": "ann", "prompt": "Hi", "t": 0.0},
                                          {"n": 2, "user": "bob", "prompt": "Yo", "t": -1.0}])).take_all()
    good, bad = sorted(rows, key=lambda r: r.get("n", r.get("id")))
    assert good["user"] == "ann" and isinstance(good["answer"], str)
    assert bad["id"] == 2 and bad["user"] == "bob" and "temperature" in bad["error"] and bad["outputs"] is None


def test_a_row_whose_parsing_raises_anything_fails_alone_on_an_actor_too(llama_dir, monkeypatch):
    """The runner's fix of a hunt's find (a row of an unforeseen shape raised out of the parser and
    ended the job) holds on Ray's actors, whose stage parsed rows the same way."""
    import pyarrow as pa

    from pagedlm.entrypoints.jobs.plain_rows import PlainFormat
    from pagedlm.integrations.ray import PagedLMStage

    real = PlainFormat.parse

    def parse(self, row, key):
        if key == 2:
            raise KeyError("surprise")
        return real(self, row, key)

    monkeypatch.setattr(PlainFormat, "parse", parse)
    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=dict(ENGINE),
                                    sampling_params={"temperature": 0.0, "max_tokens": 2})
    stage = PagedLMStage(config, json_lines_in=False, json_lines_out=True, done_ids=None)
    lines = stage(pa.table({"id": [1, 2], "prompt": ["a", "b"]})).column("line").to_pylist()
    rows = {row["id"]: row for row in map(json.loads, lines)}
    assert rows[1]["error"] is None and "the row could not be read: KeyError" in rows[2]["error"]


def test_a_value_python_has_no_form_for_fails_its_row_alone_on_an_actor(llama_dir):
    """A review: the runner's fix (a date past 9999 failed the whole job) did not reach the stage,
    which converted each batch unguarded."""
    import pyarrow as pa

    from pagedlm.integrations.ray import PagedLMStage

    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=dict(ENGINE),
                                    sampling_params={"temperature": 0.0, "max_tokens": 2})
    stage = PagedLMStage(config, json_lines_in=False, json_lines_out=True, done_ids=None)
    batch = pa.table({"id": [1, 2], "prompt": ["a", "b"], "t": pa.array([0, 2**62], pa.timestamp("us"))})
    rows = {row["id"]: row for row in map(json.loads, stage(batch).column("line").to_pylist())}
    assert rows[1]["error"] is None
    assert rows[2]["error"].startswith("column(s) 't' hold a value Python cannot represent (OverflowError")


def test_cli_on_ray_over_an_empty_input_leaves_an_empty_output(local_cluster, llama_dir, tmp_path, capsys):
    """Found by a hunt: no output directory was made (readers failed, and the same command ran
    again without --resume)."""
    (tmp_path / "in.jsonl").write_text("")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.parquet"), "--model", llama_dir,
            "--ray", "--cpus-per-actor", "0.5", "--dtype", "float32", "--max-model-len", "64"]
    assert run_main(args) == 0
    assert os.listdir(tmp_path / "out.parquet") == []
    with pytest.raises(SystemExit):
        run_main(args)
    assert "exists" in capsys.readouterr().err


def test_a_column_of_python_objects_fails_its_rows_not_the_dataset(local_cluster, llama_dir):
    """Found by a hunt: the stage took Ray's pickled-object type for a tensor's (AttributeError:
    no value_type) and the dataset failed; a value the output cannot hold is its row's error."""
    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=dict(ENGINE),
                                    sampling_params={"temperature": 0.0, "max_tokens": 2}, num_cpus=0.5)
    from fractions import Fraction  # a Python object Arrow has no type for: Ray pickles it

    rows = build_processor(config)(ray.data.from_items([{"id": i, "prompt": "a", "meta": Fraction(1, 3)}
                                                        for i in range(2)])).take_all()
    assert sorted(r["id"] for r in rows) == [0, 1]
    assert all(r["error"] == "column(s) 'meta' hold Python objects (Fraction), which the output cannot hold"
               and r["outputs"] is None for r in rows)  # refused before it ran


def test_a_row_the_stage_cannot_hold_becomes_its_error():
    """A review: the stage's replacement for a row its output cannot hold called unwritable_row with
    the arguments it had before it took the row (a TypeError for that batch)."""
    from pagedlm.entrypoints.jobs.plain_rows import PlainFormat
    from pagedlm.integrations.ray import PagedLMStage

    stage = PagedLMStage.__new__(PagedLMStage)
    stage.fmt = PlainFormat.__new__(PlainFormat)

    def table(out, batch):
        if any("boom" in row for row in out):
            raise TypeError("no column type")

    stage._table = table
    row = stage.fmt.error_row(None, {"prompt": "x", "boom": 1}, "row 3: id must be a string or an integer, got null")
    assert stage._writable(row, None)["error"] == ("row 3: id must be a string or an integer, got null (the output "
                                                   "row could not be written: TypeError: no column type)")
    written = {"id": 4, "prompt": "y", "outputs": ["z"]}
    assert stage._writable(written, None) is written


def test_processor_config_takes_a_path_as_model_source(llama_dir):
    """A review: the check of an empty model_source refused a pathlib.Path, which LLM takes."""
    import pathlib

    PagedLMProcessorConfig(model_source=pathlib.Path(llama_dir))


def test_arrows_own_extension_columns_are_carried_with_one_type_in_every_batch(llama_dir):
    """Found by a hunt: a column of Arrow's fixed-shape tensor type (Ray's under its ARROW_NATIVE
    tensor format; pyarrow and HF datasets write it) failed the whole dataset, and a bool8 column
    came back as text in a batch with values but as bool8 in an all-null batch."""
    import numpy as np
    import pyarrow as pa

    from pagedlm.integrations.ray import PagedLMStage

    config = PagedLMProcessorConfig(model_source=llama_dir, engine_kwargs=dict(ENGINE),
                                    sampling_params={"temperature": 0.0, "max_tokens": 2})
    stage = PagedLMStage(config, json_lines_in=False, json_lines_out=False, done_ids=None)

    tensors = np.arange(12, dtype=np.float32).reshape(2, 2, 3)

    def batch(flags, tensors=tensors):
        emb = pa.FixedShapeTensorArray.from_numpy_ndarray(tensors)
        flag = pa.ExtensionArray.from_storage(pa.bool8(), pa.array(flags, pa.int8()))
        return stage(pa.table({"id": [1, 2], "prompt": ["a", "b"], "emb": emb, "flag": flag}))

    with_values, all_null = batch([1, 0]), batch([None, None])
    assert with_values.schema == all_null.schema
    assert with_values.schema.field("emb").type == pa.list_(pa.list_(pa.float32()))
    assert with_values.schema.field("flag").type == pa.bool8()
    assert with_values.select(["emb", "flag", "error"]).to_pylist() == [
        {"emb": tensors[0].tolist(), "flag": True, "error": None},
        {"emb": tensors[1].tolist(), "flag": False, "error": None}]
    # A tensor stored with a permutation (a transposed array's), and a null one (found by a review:
    # each value's own conversion repeated and lost elements).
    transposed = np.arange(12, dtype=np.float32).reshape(2, 3, 2).transpose(0, 2, 1)
    assert batch([1, 0], transposed).column("emb").to_pylist() == transposed.tolist()
    emb = pa.FixedShapeTensorArray.from_numpy_ndarray(tensors)
    holes = pa.ExtensionArray.from_storage(emb.type, pa.array([None, emb.storage[1].as_py()], emb.type.storage_type))
    out = stage(pa.table({"id": [1, 2], "prompt": ["a", "b"], "emb": holes}))
    assert out.column("emb").to_pylist() == [None, tensors[1].tolist()]


def test_config_refuses_what_would_fail_in_every_actor(llama_dir, tmp_path, monkeypatch):
    """Found by a hunt: a SamplingParams object or None for a dict failed with a TypeError or an
    AttributeError; a relative model_source passed the driver's check and every actor died; a GPU
    shared by fractional actors at the default gpu_memory_utilization left the second none; the
    stage had no max_logprobs limit (pagedlm run has 20)."""
    from pagedlm import SamplingParams
    from pagedlm.integrations.ray import PagedLMStage

    for kwargs, message in [
        ({"sampling_params": SamplingParams(max_tokens=3)}, "sampling_params must be a dict of SamplingParams fields"),
        ({"engine_kwargs": None}, "engine_kwargs must be a dict of LLM"),
        ({"trust_request_chat_template": "yes"}, "trust_request_chat_template must be True or False"),
        ({"sampling_params": {"logits_processors": []}}, "SamplingParams field.s. a job row cannot set logits_processors"),
        ({"num_gpus": 0.5}, r"gpu_memory_utilization 0.9 of it: set engine_kwargs gpu_memory_utilization to at most"),
        ({"num_gpus": 0.5, "engine_kwargs": {"gpu_memory_utilization": 0.6}}, "gpu_memory_utilization 0.6 of it"),
        ({"sampling_params": {"logprobs": 50}}, r"logprobs \(50\) exceeds the actors' max_logprobs \(20\)"),
        ({"sampling_params": {"prompt_logprobs": -1}, "engine_kwargs": {"max_logprobs": 5}},
         r"prompt_logprobs \(-1, the vocabulary\) exceeds the actors' max_logprobs \(5\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            PagedLMProcessorConfig(**kwargs)
    assert PagedLMProcessorConfig(num_gpus=0.5, engine_kwargs={"gpu_memory_utilization": 0.45}).num_gpus == 0.5
    assert PagedLMProcessorConfig(num_gpus=0.5, engine_kwargs={"kv_cache_memory_bytes": 2**30}).num_gpus == 0.5
    assert PagedLMProcessorConfig(sampling_params={"logprobs": 50}, engine_kwargs={"max_logprobs": None}).sampling_params
    monkeypatch.chdir(os.path.dirname(llama_dir))
    config = PagedLMProcessorConfig(model_source=os.path.basename(llama_dir), engine_kwargs=dict(ENGINE))
    assert config.model_source == llama_dir
    stage = PagedLMStage(config, json_lines_in=False, json_lines_out=True, done_ids=None)
    assert stage.llm.llm_engine.model_config.max_logprobs == 20


def test_an_interrupt_during_ray_init_waits_for_it_then_ends_the_run(llama_dir, tmp_path, monkeypatch):
    """Found by a hunt: a Ctrl-C landing inside ray.init left Ray half connected, and its exit hook
    crashed the process (SIGSEGV, no exit status 130). The interrupt now waits for ray.init, then
    Ray is shut down and the run ends before it starts."""
    import signal

    calls = []

    def init(**kwargs):
        signal.raise_signal(signal.SIGINT)  # arrives half-way
        calls.append("init returned")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--model", llama_dir,
            "--ray", "--cpus-per-actor", "0.5", "--dtype", "float32", "--max-model-len", "64"]
    with pytest.raises(KeyboardInterrupt):  # cli.main's exit status 130
        run_main(args)
    assert calls == ["init returned", "shutdown"]
    assert not os.path.exists(tmp_path / "out.jsonl.job.json")


def test_an_actor_larger_than_a_node_is_refused_naming_the_flag_given(llama_dir, tmp_path, capsys):
    """Found by a hunt: --threads-per-actor 30 was refused as "--cpus-per-actor 30", a flag not given."""
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--model", llama_dir, "--ray"]
    for flag in ("--threads-per-actor", "--cpus-per-actor"):
        with pytest.raises(SystemExit):
            run_main(args + [flag, "1000"])
        assert f"{flag} 1000 is more than the" in capsys.readouterr().err
