"""The API edge's check of a request's constraint: compiled (or found compiled) off the event loop, within the
server's bounds, before anything is queued; errors name the field as the client sent it."""

from __future__ import annotations

from collections.abc import Sequence

from server.api import convert
from server.api.inference_convert import constraint_error
from server.decoding import DecodingParams
from server.engine.constraints import check_constraint as compile_off_loop
from server.errors import InvalidArgument


async def check_constraint(model, params: DecodingParams, limits: convert.RequestLimits, *,
                           where: str = "options", context_ids: Sequence[int] = ()) -> None:
    """INVALID_ARGUMENT naming e.g. "options.constraint.regex" (`where` = "parameters": the Open Inference
    Protocol's "parameters.regex") if `params.constraint` does not compile for `model`'s output vocabulary (a
    `ServedModel`). Nothing to do without a constraint. `context_ids`: the prompt the output follows."""
    if params.constraint is None:
        return
    bundle = model.bundle
    spec = bundle.spec
    try:
        await compile_off_loop(params, bundle.tokenizer(spec.output_tokenizer_role), spec.vocab_size,
                               spec.special.eos, limits.constraints, context_ids)
    except InvalidArgument as error:
        raise edge_error(error, where) from None


def edge_error(error: InvalidArgument, where: str) -> InvalidArgument:
    """A domain error about a constraint ("constraint.regex ...") as the API names the field."""
    if error.field is None or not error.field.startswith("constraint"):
        return error
    error = convert.renamed(error, where)
    # The Open Inference Protocol takes the constraint as parameters regex, choice, json_schema, grammar.
    return constraint_error(error) if where == "parameters" else error
