"""pagedlm on Ray Data: one ``LLM`` per actor of an actor pool, rows in the job runner's plain schema.

Shaped like Ray Data LLM's ``build_processor(vLLMEngineProcessorConfig(...))``::

    import ray
    from pagedlm.integrations.ray import PagedLMProcessorConfig, build_processor

    processor = build_processor(PagedLMProcessorConfig(model_source="/models/llama", concurrency=4))
    ds = processor(ray.data.read_parquet("/shared/prompts.parquet"))
    ds.write_parquet("/shared/answers")

Rows are the plain rows of ``pagedlm run`` (docs/jobs.md): ``id`` + one of ``prompt`` /
``messages`` / ``prompt_token_ids``, optional ``sampling_params``, other columns carried through; the
output adds ``outputs``, ``prompt_tokens``, ``completion_tokens``, ``error``, ``prompt_logprobs``
and ``prompt_token_id_logprobs`` (the last two null where a row did not ask for them). A row that cannot
run gets its ``error`` and never fails the dataset (Ray Data LLM's ``should_continue_on_error``,
always on). Needs ``pip install 'pagedlm[ray]'``.
"""

import functools
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    import ray.data

from pagedlm.entrypoints.jobs.files import UnreadValue, as_text, batch_rows, id_text, loads_row, rows_to_table, to_json
from pagedlm.engine.arg_utils import VLLM_NO_OP_ARGS
from pagedlm.entrypoints.llm import LLM, check_engine_args
from pagedlm.config import GPU_MEMORY_UTILIZATION, check_device_name
from pagedlm.transformers_utils.gguf import default_model_path
from pagedlm.transformers_utils.hub import is_hub_model_id
from pagedlm.entrypoints.jobs.plain_rows import PROMPT_COLUMNS, RESULT_COLUMNS, PlainFormat, output_schema
from pagedlm.entrypoints.jobs.rows import (
    JOB_MAX_LOGPROBS, RowError, check_thinking_budget, engine_has_reasoning, field_error, parse_row, sampling_defaults,
    sampling_params_from, unwritable_row,
)


logger = logging.getLogger("pagedlm")

# A row function of Ray Data LLM's build_processor (preprocess, postprocess).
RowFn = Callable[[dict[str, Any]], dict[str, Any]]

# LLM arguments that may name a local file or directory, which an actor opens from its own
# working directory (a chat_template or generation_config that names none is passed as it is).
_PATH_ARGS = ("tokenizer", "chat_template", "generation_config")


@dataclass
class PagedLMProcessorConfig:
    """How the processor runs (Ray Data LLM's ``vLLMEngineProcessorConfig``, in pagedlm's terms).

    Args:
        model_source: a checkpoint directory or ``.gguf`` every node can read, or a Hub id (from
            each node's Hugging Face cache); None for the embedded SmolLM2-135M-Instruct (each node
            fetches it once).
        engine_kwargs: ``LLM(...)`` keyword arguments (dtype, max_model_len, max_num_seqs, ...);
            ``max_logprobs`` is 20 unless given, as in ``pagedlm run`` (a row asking for the
            vocabulary's logprobs over a long prompt would take gigabytes, and Ray retries a batch
            whose actor died without end).
        sampling_params: the rows' sampling defaults (``SamplingParams`` fields), under each row's
            own ``sampling_params``; the model's generation config is under both.
        concurrency: actors in the pool, one ``LLM`` each; ``(m, n)``: a pool that Ray scales between
            ``m`` and ``n`` actors (``1 <= m <= n``), as in Ray Data LLM.
        batch_size: rows per batch handed to an actor; its ``LLM`` schedules the whole batch with
            continuous batching, so make it a few times ``max_num_seqs``.
        num_cpus / num_gpus: Ray resources per actor (a GPU actor sets num_gpus=1, or a fraction of
            one to share it, with engine_kwargs ``gpu_memory_utilization`` at most that fraction;
            more is refused, as is a GPU for a 'cpu' device); Ray reserves
            one CPU for an actor without ``num_cpus``. The actors must leave at least one CPU of the
            cluster free for Ray's read and write tasks, else the dataset waits forever (a warning
            says so when the cluster Ray has joined is that small: ``leaves_a_cpu``).
        torch_threads: intra-op threads of each actor's ``LLM`` (default: the CPUs it reserves,
            ``num_cpus`` rounded down, at least 1; one for an actor without ``num_cpus``).
        trust_request_chat_template: take a row's own ``chat_template`` (vLLM's server flag): a
            template is code the actors run, and a loop in one can hold a batch; else such a row is
            its error.
    """

    model_source: str | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling_params: dict[str, Any] = field(default_factory=dict)
    concurrency: int | tuple[int, int] = 1
    batch_size: int = 256
    num_cpus: float | None = None
    num_gpus: float | None = None
    torch_threads: int | None = None
    trust_request_chat_template: bool = False

    def __post_init__(self) -> None:
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        sizes = tuple(self.concurrency) if isinstance(self.concurrency, (tuple, list)) else (self.concurrency,)
        if not (len(sizes) in (1, 2) and all(type(n) is int and n >= 1 for n in sizes) and sizes[0] <= sizes[-1]):
            raise ValueError(f"concurrency must be a positive integer or a pair (m, n) of them with m <= n, "
                             f"got {self.concurrency!r}")
        for name, value in (("sampling_params", self.sampling_params), ("engine_kwargs", self.engine_kwargs)):
            if not isinstance(value, dict):
                what = "SamplingParams fields (the rows' defaults)" if name == "sampling_params" else "LLM(...) arguments"
                raise ValueError(f"{name} must be a dict of {what}, got {type(value).__name__}")
        if type(self.trust_request_chat_template) is not bool:
            raise ValueError(f"trust_request_chat_template must be True or False, got {self.trust_request_chat_template!r}")
        try:  # a bad value fails here, not in every actor
            defaults = sampling_params_from(self.sampling_params, {}, "sampling_params", {})
        except RowError as exc:
            raise ValueError(str(exc)) from None
        limit = self.engine_kwargs.get("max_logprobs", JOB_MAX_LOGPROBS)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(defaults, name)
            if k is not None and limit not in (None, -1) and (k == -1 or k > limit):
                raise ValueError(f"sampling_params: {name} ({'-1, the vocabulary' if k == -1 else k}) exceeds the "
                                 f"actors' max_logprobs ({limit}): raise engine_kwargs max_logprobs")
        check_thinking_budget(defaults, engine_has_reasoning(self.engine_kwargs),
                              "sampling_params: thinking_token_budget needs the model's reasoning strings: "
                              "engine_kwargs reasoning_parser or reasoning_config (pagedlm run: --reasoning-parser)")
        engine_args = [name for name, p in inspect.signature(LLM.__init__).parameters.items()
                       if name not in ("self", "model") and p.kind is not p.VAR_KEYWORD] + list(VLLM_NO_OP_ARGS)
        unknown = sorted(set(self.engine_kwargs) - set(engine_args))
        if unknown:
            raise ValueError(f"engine_kwargs: unknown argument(s) {', '.join(unknown)}; LLM takes {', '.join(engine_args)}")
        if self.model_source is not None and not (isinstance(self.model_source, (str, os.PathLike))
                                                  and os.fspath(self.model_source)):
            raise ValueError(f"model_source must be a checkpoint directory, a .gguf file or a Hugging Face model id, or "
                             f"None for the embedded default model; got {self.model_source!r}")
        if self.model_source is not None and os.path.exists(self.model_source):
            # The actors' working directory is not this process's (found by a hunt: every actor died).
            self.model_source = os.path.abspath(self.model_source)
        elif self.model_source is not None and not is_hub_model_id(os.fspath(self.model_source)):
            # A hunt: every actor's LLM refused it, and the dataset failed with ActorDiedError.
            raise ValueError(f"model_source {os.fspath(self.model_source)!r} does not exist here, and is no Hugging Face "
                             "model id (org/name): a checkpoint directory or .gguf file every node reads at that path")
        # Likewise the engine's local paths (a hunt: a relative --chat-template file killed every actor).
        self.engine_kwargs = {k: os.path.abspath(v) if k in _PATH_ARGS and isinstance(v, str) and os.path.exists(v)
                              else v for k, v in self.engine_kwargs.items()}
        if "device" in self.engine_kwargs:  # its name here; whether the actors' machines have it, there
            try:
                check_device_name(self.engine_kwargs["device"])
            except ValueError as exc:  # a hunt: every actor died, and the CLI left its record behind
                raise ValueError(f"engine_kwargs: {exc}") from None
        # Not downloaded here: a driver that runs no inference may be offline.
        model = self.model_source if self.model_source is not None else default_model_path(download=False)
        if model is not None and os.path.exists(model):
            # Their values too, where this process can read the model, so that a bad one fails
            # here and not in every actor; an actor's device may not be this process's.
            on_device = ("device",)
            try:
                check_engine_args(model, {k: v for k, v in self.engine_kwargs.items() if k not in on_device})
            except ValueError as exc:
                raise ValueError(f"engine_kwargs: {exc}") from None
        if self.torch_threads is not None and (type(self.torch_threads) is not int or self.torch_threads < 1):
            raise ValueError(f"torch_threads must be a positive integer, got {self.torch_threads!r}")
        # Finite (an actor of inf CPUs is never placed) and no bool (True is no count of CPUs).
        for name, value, positive in (("num_cpus", self.num_cpus, True), ("num_gpus", self.num_gpus, False)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if value is not None and not (number and (value > 0 if positive else value >= 0)):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        # One LLM an actor, on one device (found by a hunt: 4 GPUs reserved, one used).
        if self.num_gpus is not None and self.num_gpus > 1:
            raise ValueError(f"num_gpus must be at most 1 (an actor's LLM runs on one device, tensor_parallel_size "
                             f"1; a fraction shares a GPU), got {self.num_gpus!r}")
        device = str(self.engine_kwargs.get("device", ""))
        if self.num_gpus and device.startswith("cpu"):
            raise ValueError(f"num_gpus={self.num_gpus!r} reserves a GPU for actors whose engine_kwargs device is "
                             f"{device!r}: leave num_gpus out, or run on 'cuda'")
        # Actors sharing a GPU each take gpu_memory_utilization of it (found by a hunt: at the default
        # 0.9 the second was refused, and Ray restarts a failed actor without end).
        sized = any(k in self.engine_kwargs for k in ("num_kv_blocks", "kv_cache_memory_bytes"))
        utilization = self.engine_kwargs.get("gpu_memory_utilization") or GPU_MEMORY_UTILIZATION
        if self.num_gpus and self.num_gpus < 1 and not sized and utilization > self.num_gpus:
            raise ValueError(f"num_gpus={self.num_gpus!r} shares a GPU among actors, but each would take "
                             f"gpu_memory_utilization {utilization} of it: set engine_kwargs gpu_memory_utilization "
                             f"to at most num_gpus (e.g. {round(self.num_gpus * 0.9, 3)}), or kv_cache_memory_bytes")

    @property
    def threads(self) -> int:
        """Each actor's torch threads: ``torch_threads``, else the CPUs it reserves."""
        return self.torch_threads or max(1, int(self.num_cpus or 1))

    @property
    def reserved_cpus(self) -> float:
        """The CPUs the largest actor pool holds (Ray's default of one per actor without ``num_cpus``)."""
        sizes = self.concurrency if isinstance(self.concurrency, (tuple, list)) else (self.concurrency,)
        return sizes[-1] * (1 if self.num_cpus is None else self.num_cpus)

    def leaves_a_cpu(self, cluster_cpus: float) -> bool:
        """Whether the largest actor pool leaves Ray's read and write tasks a whole CPU of
        ``cluster_cpus``."""
        return cluster_cpus - self.reserved_cpus >= 1


class Processor:
    """``processor(ds)``: the dataset with each row's completions (lazy, as Ray Data is)."""

    def __init__(self, config: PagedLMProcessorConfig, json_lines_in: bool = False, json_lines_out: bool = False,
                 done_ids: Any = None, preprocess: RowFn | None = None, postprocess: RowFn | None = None,
                 json_fields: list[str] | None = None) -> None:
        # Checked again, as Ray Data LLM's config checks an assignment (found by a hunt: fields set
        # after construction, a relative model_source or batch_size 0, reached the actors unchecked).
        self.config = config = replace(config)
        self._stage_kwargs = {"config": config, "json_lines_in": json_lines_in, "json_lines_out": json_lines_out,
                              "done_ids": done_ids, "json_fields": json_fields}
        self.preprocess, self.postprocess = preprocess, postprocess

    def __call__(self, ds: "ray.data.Dataset") -> "ray.data.Dataset":
        import ray

        if ray.is_initialized():
            cpus = ray.cluster_resources().get("CPU", 0)
            if not self.config.leaves_a_cpu(cpus):
                logger.warning("the actors reserve %s CPUs of the cluster's %s: less than one is left for Ray's read "
                               "and write tasks, and the dataset waits until the cluster grows (set concurrency or "
                               "num_cpus lower)", self.config.reserved_cpus, cpus)
        resources = {k: v for k, v in (("num_cpus", self.config.num_cpus), ("num_gpus", self.config.num_gpus))
                     if v is not None}
        if self.preprocess is not None:
            ds = ds.map(functools.partial(_preprocessed, self.preprocess))
        ds = ds.map_batches(
            PagedLMStage, fn_constructor_kwargs=self._stage_kwargs, batch_size=self.config.batch_size,
            batch_format="pyarrow", compute=_actor_pool(self.config.concurrency), **resources,
        )
        return ds if self.postprocess is None else ds.map(functools.partial(_postprocessed, self.postprocess))


def _preprocessed(preprocess: RowFn, row: dict[str, Any]) -> dict[str, Any]:
    """``preprocess(row)`` merged into ``row``, as Ray Data LLM merges it (the input's columns carry
    through to ``postprocess``; a hunt found them dropped). Where it returns a prompt (``prompt``,
    ``messages`` or ``prompt_token_ids``), the input's prompt of another kind is not kept beside it.

    Raises:
        TypeError: ``preprocess`` returned no dict (it fails the dataset, as in Ray Data LLM).
    """
    out = preprocess(row)
    if not isinstance(out, dict):
        raise TypeError(f"preprocess must return a dict (the row's new columns), got {type(out).__name__}")
    replaced = PROMPT_COLUMNS if any(k in out for k in PROMPT_COLUMNS) else ()
    return {**{k: v for k, v in row.items() if k not in replaced}, **out}


def _postprocessed(postprocess: RowFn, row: dict[str, Any]) -> dict[str, Any]:
    """``postprocess(row)``, but a row whose ``error`` is set passes as it is: Ray Data LLM's error
    rows bypass postprocess (a hunt: a postprocess reading ``outputs`` failed the dataset on one)."""
    return row if row.get("error") is not None else postprocess(row)


def _actor_pool(concurrency: int | tuple[int, int]) -> "ray.data.ActorPoolStrategy":
    import ray

    if isinstance(concurrency, (tuple, list)):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return ray.data.ActorPoolStrategy(size=concurrency)


def build_processor(config: PagedLMProcessorConfig, preprocess: RowFn | None = None,
                    postprocess: RowFn | None = None) -> Processor:
    """A processor that completes every row of a dataset (Ray Data LLM's ``build_processor``):
    ``preprocess`` returns columns that are merged into each input row (the plain schema's ``id``
    and prompt among them), ``postprocess`` turns each output row into what the caller keeps (a row
    whose ``error`` is set passes it by, as it is), both with ``Dataset.map`` (an exception there
    is the caller's and fails the dataset, as in Ray Data LLM)."""
    return Processor(config, preprocess=preprocess, postprocess=postprocess)


class PagedLMStage:
    """The actor: one ``LLM``, created once; each call completes one batch of rows.

    ``json_lines_in``: the batch is a ``text`` column of JSON lines, str (``read_text``'s) or
    UTF-8 bytes (``JsonLinesDatasource``'s); a line that is not JSON becomes an error row instead
    of failing the read. ``json_lines_out``: the result is one
    ``line`` column of output rows as JSON (written as they are, whatever their types).
    ``done_ids``: ids (as text) already in the output, whose rows are dropped (resume).
    ``json_fields``: the JSON input's top-level fields, when its rows are written as Parquet: every
    batch has a column for each (null where a row lacks it), so the output's files share a schema.
    """

    def __init__(self, config: PagedLMProcessorConfig, json_lines_in: bool, json_lines_out: bool,
                 done_ids: Any, json_fields: list[str] | None = None) -> None:
        import torch

        torch.set_num_threads(config.threads)
        self.llm = LLM(config.model_source or default_model_path(), **{"max_logprobs": JOB_MAX_LOGPROBS,
                                                                         **config.engine_kwargs})
        self.fmt = PlainFormat(self.llm.get_tokenizer(), sampling_defaults(self.llm, config.sampling_params),
                               arrow_rows=not json_lines_in,
                               trust_request_chat_template=config.trust_request_chat_template)
        self.json_lines_in = json_lines_in
        self.json_lines_out = json_lines_out
        self.done_ids = set(done_ids or ())
        self.json_fields = [as_text(name) for name in json_fields or ()]  # the names rows_to_table writes

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.json_lines_in:
            rows = [_parse_line(line) for line in batch.column("text").to_pylist()]
        else:
            objects = [f.name for f in batch.schema if getattr(f.type, "extension_name", "") == _PICKLED_OBJECTS]
            rows = [_without_objects(_plain(row), error, objects) for row, error in batch_rows(_tensors_nested(batch))]
        out: list[dict | None] = []
        runnable: dict[int, Any] = {}
        seen: set[str] = set()
        for row, read_error in rows:
            key = self.fmt.key_of(row)  # None for a line that is no JSON
            text_key = id_text(key)
            if text_key is not None and text_key in self.done_ids:
                continue
            if read_error is not None:
                out.append(self.fmt.error_row(key, row, read_error))
                continue
            if text_key is not None and text_key in seen:
                out.append(self.fmt.error_row(key, row, f"duplicate id {key!r} (an earlier row of its batch has it)",
                                              self.fmt.key_field))
                continue
            seen.add(text_key)
            job_row = parse_row(self.fmt, row, key)
            if isinstance(job_row, RowError):
                where = f" (the row {to_json(row)[:80]})" if key is None else ""
                out.append(self.fmt.error_row(key, row, f"{job_row}{where}", job_row.param))
                continue
            runnable[len(out)] = job_row
            out.append(None)
        positions = list(runnable)
        results = self.llm.generate_as_completed(
            [runnable[p].prompt for p in positions], [runnable[p].params for p in positions],
            max_in_flight=len(positions) or None, return_errors=True,
        )
        for index, result in results:
            job_row = runnable[positions[index]]
            if isinstance(result, ValueError):
                out[positions[index]] = self.fmt.error_row(job_row.key, job_row.row, str(field_error(result, job_row.names)))
            else:
                out[positions[index]] = self.fmt.result_row(job_row, result)
        try:
            return self._table(out, batch)
        except (TypeError, ValueError, RecursionError):  # a row the output cannot hold is its error, as in the runner
            return self._table([self._writable(row, batch) for row in out], batch)

    def _writable(self, row: dict, batch: pa.Table) -> dict:
        try:
            self._table([row], batch)
        except (TypeError, ValueError, RecursionError) as exc:
            return unwritable_row(self.fmt, self.fmt.key_of(row), exc, row)
        return row

    def _table(self, out: list[dict], batch: pa.Table) -> pa.Table:
        """The output rows as the stage returns them: JSON lines, or columns (the input's carried)."""
        if self.json_lines_out:
            return pa.table({"line": pa.array([as_text(row) for row in out], pa.string())})
        if self.json_lines_in:  # JSON rows to Parquet: batches must agree on types, so carried values are text
            # (keys with lone surrogates as their escapes, as rows_to_table names columns)
            out = [{as_text(k): v if k in RESULT_COLUMNS else as_text(v) for k, v in row.items()} for row in out]
            for row in out:
                if row.get("id") is not None:
                    row["id"] = str(row["id"])
            names = dict.fromkeys(["id", *self.json_fields, *(k for r in out for k in r)])
            carried = pa.schema([(name, pa.string()) for name in names if name not in RESULT_COLUMNS])
        else:
            carried = pa.schema([pa.field(f.name, _plain_type(f.type)) for f in batch.schema])
        # Every column in every batch (prompt_logprobs too), so the output's files share one schema.
        schema = output_schema(carried)
        return rows_to_table([{name: row.get(name) for name in schema.names} for row in out], schema)


def _plain_type(typ: pa.DataType) -> pa.DataType:
    """A tensor column's type as the nested lists ``_plain`` and ``_tensors_nested`` turn its
    values into: Ray types a batch of equal-shaped arrays and one of unequal shapes differently
    (and Arrow's own fixed-shape tensor type where its DataContext asks for it), and neither Parquet
    nor pandas joins them."""
    name = typ.extension_name if isinstance(typ, pa.BaseExtensionType) else ""
    # Not _PICKLED_OBJECTS, a column of Python objects (found by a hunt: it had no value_type).
    if not (name.startswith("ray.data.arrow_") and "tensor" in name or name == _ARROW_TENSOR):
        return typ
    plain = typ.value_type
    for _ in range(getattr(typ, "ndim", None) or len(typ.shape)):
        plain = pa.list_(plain)
    return plain


_PICKLED_OBJECTS = "ray.data.arrow_pickled_object"  # Ray's column type for Python objects Arrow has no type for
_ARROW_TENSOR = "arrow.fixed_shape_tensor"  # Arrow's canonical tensor type (a flat list a value, in Python)


def _tensors_nested(batch: pa.Table) -> pa.Table:
    """``batch`` with its Arrow fixed-shape tensor columns as nested lists of their shape, as Ray's
    own tensor columns' values become (found by a hunt: such a column failed the whole dataset)."""
    for i, f in enumerate(batch.schema):
        if getattr(f.type, "extension_name", "") == _ARROW_TENSOR:
            values = []
            for chunk in batch.column(i).chunks:
                # The array's own conversion: it follows a permutation (a value's to_numpy does not).
                valid = chunk.is_valid()
                dense = iter(chunk.filter(valid).to_numpy_ndarray().tolist() if chunk.null_count < len(chunk) else ())
                values += [next(dense) if ok else None for ok in valid.to_pylist()]
            batch = batch.set_column(i, f.name, pa.array(values, _plain_type(f.type)))
    return batch


def _without_objects(row: dict, error: str | None, columns: list[str]) -> tuple[dict, str | None]:
    """A row that holds Python objects (in ``columns``, Ray's pickled-object columns), which the
    output cannot hold, as its error before it runs, and without them; other rows as they are."""
    objects = [name for name in columns if row.get(name) is not None]
    if error is not None or not objects:
        return row, error
    return ({k: v for k, v in row.items() if k not in objects},
            f"column(s) {', '.join(map(repr, objects))} hold Python objects ({type(row[objects[0]]).__name__}), "
            "which the output cannot hold")


def _plain(row: dict) -> dict:
    """A row of Arrow values with a tensor column's numpy arrays as lists, as JSON would give them."""
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()}


def _parse_line(line: str | bytes) -> tuple[Any, str | None]:
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:  # no id, as the local runner's: a resume runs it once mended
            return None, (f"a line is not UTF-8 (byte 0x{line[exc.start]:02x} at byte {exc.start + 1}): save the file "
                          "as UTF-8")
    try:  # RecursionError: nested too deep
        return loads_row(line.lstrip("\ufeff")), None
    except UnreadValue as exc:
        return None, f"a line cannot be read: {exc}: {line[:80]!r}"
    except (ValueError, RecursionError) as exc:
        return None, f"a line is not valid JSON ({exc}): {line[:80]!r}"
