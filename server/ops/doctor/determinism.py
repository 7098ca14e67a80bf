"""Check 6, determinism and tokenizer: the same greedy prompt twice gives the same ids; the session and
the one-shot CLI agree on them (byte for byte: the CLI prints the tokens' bytes); the host tokenizer
round-trips the output; the bundle's chat template (or the built-in one) renders a conversation."""

from __future__ import annotations

import asyncio

from server.backends.adb.quoting import sh_quote
from server.errors import InvalidRequest
from server.ops.doctor.context import MAX_NEW, PROMPT, Findings, PhoneContext
from server.ops.doctor.protocol import generate
from server.ops.doctor.report import CheckResult
from server.ops.doctor.runs import run_oneshot
from server.serving.chat.template import ChatTemplate, TemplateError
from server.serving.tokens import IM_END, IM_START, HostTokenizer

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def first_difference(a: bytes | list[int], b: bytes | list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def check_determinism(ctx: PhoneContext) -> CheckResult:
    tok = await ctx.host_tokenizer()
    assert ctx.oneshot is not None
    found = Findings()
    data: dict[str, object] = {}
    if ctx.session is not None and ctx.session_ids is not None:
        ctx.steps.step(ctx.serial, "determinism: the same prompt again")
        again, _ = await generate(ctx, ctx.session, tok.encode(PROMPT), MAX_NEW, stop_ids=ctx.stop_ids(tok),
                                  request_id="doctor-2")
        first = ctx.session_ids
        data.update(ids=first, again=again)
        if again != first:
            k = first_difference(first, again)
            found.fail(f"greedy output differs between two session runs from token {k} "
                       f"({first[k:k + 3]} vs {again[k:k + 3]})",
                       advice="greedy decoding must be deterministic (state reuse and parity depend on it); "
                       "report it with this output", command=ctx.doctor("--json"))
        else:
            found.notes.append(f"same {len(first)} ids twice")
        session_bytes = b"".join(tok.token_bytes(i) for i in first)
        data["agree"] = session_bytes == ctx.oneshot.stdout
        if session_bytes != ctx.oneshot.stdout:
            k = first_difference(session_bytes, ctx.oneshot.stdout)
            found.fail(f"session and one-shot disagree from byte {k}: {session_bytes[k:k + 20]!r} vs "
                       f"{ctx.oneshot.stdout[k:k + 20]!r}", advice="both modes must decode the same greedy "
                       "tokens; report it with this output", command=ctx.doctor("--json"))
        else:
            found.notes.append("session = one-shot byte for byte")
        output = first
    else:
        ctx.steps.step(ctx.serial, "determinism: the one-shot run again")
        again_run = await run_oneshot(ctx, PROMPT, MAX_NEW, "determinism: one-shot again")
        data["agree"] = None
        if again_run.stdout != ctx.oneshot.stdout:
            k = first_difference(again_run.stdout, ctx.oneshot.stdout)
            found.fail(f"two one-shot runs differ from byte {k}", advice="greedy decoding must be "
                       "deterministic; report it with this output", command=ctx.doctor("--json"))
        else:
            found.notes.append("same output twice (one-shot; no session to compare with)")
        output = tok.encode(ctx.oneshot.stdout.decode("utf-8", "replace"))
    _round_trip(ctx, tok, output, found)
    await _template(ctx, tok, found, data)
    return found.result(data)


def _round_trip(ctx: PhoneContext, tok: HostTokenizer, ids: list[int], found: Findings) -> None:
    back = tok.encode(tok.decode(ids))
    if back != ids:
        found.warn(f"the host tokenizer does not round-trip the output ({len(ids)} ids -> text -> {len(back)} ids)",
                   advice="the phone's tokens are not the canonical tokenization of their text: a one-shot "
                   "phone (text in, text out) then counts tokens differently", command=ctx.doctor("--json"))
    else:
        found.notes.append("the host tokenizer round-trips the output")


async def _template(ctx: PhoneContext, tok: HostTokenizer, found: Findings, data: dict[str, object]) -> None:
    folder = ctx.tokenizer_path.parent if ctx.tokenizer_path else None
    bundle_dir = f"{ctx.root}/{ctx.bundle.name}" if ctx.bundle else ctx.root
    try:
        template = await asyncio.to_thread(ChatTemplate.for_bundle, folder)
        text = template.render(MESSAGES, add_generation_prompt=True)
    except (TemplateError, InvalidRequest) as e:
        found.fail(f"the chat template does not render: {e}", advice="fix or remove the bundle's "
                   "chat_template.jinja (the built-in Qwen3.5 template is used without one)",
                   command=ctx.adb_shell(f"ls -l {sh_quote(bundle_dir)}"))
        return
    ids = tok.encode(text)
    data.update(template=template.source, template_tokens=len(ids))
    if text.rfind(f"{IM_START}assistant") <= text.rfind(IM_END):
        found.fail(f"the chat template ({template.source}) renders no assistant turn to generate into",
                   advice="use a ChatML template (<|im_start|>assistant at the end)", command=ctx.doctor("--json"))
    else:
        found.notes.append(f"chat template renders ({template.source.rsplit('/', 1)[-1]}, {len(ids)} tokens)")
