"""The one place where the server reaches into vLLM's OpenAI server: it runs vLLM's own chat
serving (`OpenAIServingChat`: sampling parameters and generation_config defaults, max_tokens,
structured outputs, tool parsers, logprobs, streaming chunks and usage, errors) and vLLM's
renderer (tool_choice checks, chat template, tokenisation, multimodal processing), and swaps in
only our media loading.

Follows vLLM 0.32.0: `vllm/entrypoints/openai/chat_completion/serving.py`,
`vllm/renderers/online_renderer.py` (`preprocess_chat`, whose tool-parser tail is copied below)
and `vllm/renderers/chat_utils.py` (`_postprocess_messages`, a private helper). Re-read those on
a vLLM upgrade; `tests/server/test_api_parity.py` compares the result with vLLM's own server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.renderers import merge_kwargs
from vllm.renderers.chat_utils import _postprocess_messages
from vllm.renderers.hf import safe_apply_chat_template
from vllm.renderers.online_renderer import OnlineRenderer

from server.chat_request import ChatRequest, LoadChat
from server.settings import Settings

FOLLOWS_VLLM = "0.32.0"


class MediaRenderer(OnlineRenderer):
    """vLLM's `OnlineRenderer` with our media pipeline in place of vLLM's media connectors."""

    def __init__(self, load_chat: LoadChat, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._load_chat = load_chat

    async def preprocess_chat(
        self,
        request: Any,
        messages: list[Any],
        default_template: str | None,
        default_template_content_format: Any,
        default_template_kwargs: dict[str, Any] | None,
        tool_dicts: list[dict[str, Any]] | None = None,
        parser: Any = None,
        *,
        skip_mm_cache: bool = False,
    ) -> tuple[list[Any], list[Any]]:
        """vLLM 0.32.0's `preprocess_chat` (called by `render_chat` after its tool_choice and
        chat-template checks) with our loaded media: the conversation goes through vLLM's
        template call, vLLM's tokenisation and multimodal processing. Left out: vLLM's refusal
        of per-request media kwargs (ours are bounded by the server's limits) and the Mistral
        tokenizer's grammar branch (no Mistral models here)."""
        chat = await self._load_chat(request)
        request.served.stts = chat.report
        template_kwargs = merge_kwargs(default_template_kwargs, {"tools": tool_dicts})
        chat_params = request.build_chat_params(
            default_template, default_template_content_format
        ).with_defaults(template_kwargs)
        _postprocess_messages(chat.conversation)  # tool_calls arguments: JSON text -> dicts
        text = await asyncio.to_thread(
            safe_apply_chat_template,
            self.model_config,
            self.renderer.get_tokenizer(),
            chat.conversation,
            **(chat_params.get_apply_chat_template_kwargs() | {"tokenize": False}),
        )
        prompt: dict[str, Any] = {"prompt": text}
        if chat.multi_modal_data:
            prompt["multi_modal_data"] = chat.multi_modal_data
        if chat.mm_processor_kwargs:
            prompt["mm_processor_kwargs"] = chat.mm_processor_kwargs
        extras = {"cache_salt": request.cache_salt} if request.cache_salt else None
        (engine_input,) = await self.renderer.render_cmpl_async(
            [prompt],
            request.build_tok_params(self.model_config),
            prompt_extras=extras,
            skip_mm_cache=skip_mm_cache,
        )
        if parser is not None and (
            parser.always_adjust_request
            or parser.reasoning_parser_cls is not None
            or request.tool_choice != "none"
        ):
            # vLLM 0.32.0's tail: the tool parser turns tool_choice "required" / a named
            # function into structured output (a JSON schema of the calls).
            request = parser(
                self.renderer.get_tokenizer(),
                request.tools,
                model_config=self.model_config,
                chat_template_kwargs=chat_params.chat_template_kwargs,
            ).adjust_request(request=request)
        return chat.conversation, [engine_input]


async def _observe(request: ChatRequest, outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Passes engine outputs through, noting the first token's time, the decode interval (from
    the engine's own stats: a non-streaming request only sees its final output) and the tokens
    generated, for the server's metrics."""
    served = request.served
    async for output in outputs:
        tokens = sum(len(c.token_ids) for c in output.outputs)
        if output.finished and not served.completion_tokens and not tokens:
            # vLLM: finish_reason "error" is a retryable request-level failure (e.g. its
            # multimodal processor caches drifted apart; the stale entries are dropped by now)
            served.failed_before_output = any(c.finish_reason == "error" for c in output.outputs)
        if tokens and served.first_token_at is None:
            served.first_token_at = time.monotonic()
        served.completion_tokens += tokens
        stats = getattr(output, "metrics", None)
        first, last = getattr(stats, "first_token_ts", 0), getattr(stats, "last_token_ts", 0)
        if output.finished and first and last:
            served.decode_seconds = max(0.0, last - first)
        yield output


class ChatServing(OpenAIServingChat):
    """vLLM's chat serving, its engine outputs observed for the server's metrics."""

    async def chat_completion_full_generator(  # type: ignore[override]
        self, request: ChatRequest, result_generator: AsyncIterator[Any], *args: Any, **kw: Any
    ) -> Any:
        observed = _observe(request, result_generator)
        return await super().chat_completion_full_generator(request, observed, *args, **kw)

    def chat_completion_stream_generator(  # type: ignore[override]
        self, request: ChatRequest, result_generator: AsyncIterator[Any], *args: Any, **kw: Any
    ) -> AsyncIterator[str]:
        observed = _observe(request, result_generator)
        return super().chat_completion_stream_generator(request, observed, *args, **kw)


def build_chat_serving(engine_client: Any, settings: Settings, load_chat: LoadChat) -> ChatServing:
    """vLLM's serving objects, configured as `vllm serve` would be by the same flags."""
    common = dict(
        request_logger=None,
        chat_template=None,
        chat_template_content_format="auto",
        enable_auto_tools=settings.enable_auto_tool_choice,
        tool_parser=settings.tool_call_parser,
    )
    renderer = MediaRenderer(
        load_chat,
        model_config=engine_client.model_config,
        renderer=engine_client.renderer,
        # per-request media knobs are bounded by the server's own limits (frames, pixels,
        # seconds), so they need no `--trust-request-mm-kwargs` here
        trust_request_mm_kwargs=True,
        **common,
    )
    models = OpenAIServingModels(
        engine_client,
        [BaseModelPath(name=settings.served_model_name, model_path=str(settings.model))],
    )
    serving = ChatServing(engine_client, models, "assistant", online_renderer=renderer, **common)
    if settings.default_max_tokens and "max_tokens" not in serving.default_sampling_params:
        serving.default_sampling_params["max_tokens"] = settings.default_max_tokens
    return serving


def sampling_error(request: ChatCompletionRequest, serving: ChatServing) -> Exception | None:
    """The error vLLM would raise for the request's sampling fields, found before any media is
    loaded (vLLM itself finds it only after rendering)."""
    asked = request.max_completion_tokens
    asked = request.max_tokens if asked is None else asked
    try:
        request.to_sampling_params(
            1 << 20 if asked is None else asked, serving.default_sampling_params
        )
    except Exception as exc:  # vLLM raises VLLMValidationError, ValueError, TypeError
        return exc
    return None


def error_fields(exc: Exception) -> tuple[int, str, str | None]:
    """(HTTP status, message, param) as vLLM's server would answer `exc`; where vLLM names the
    parameter only in the message (`presence_penalty must be in [-2, 2]`), `param` names it."""
    error = create_error_response(exc).error
    param = error.param
    if param is None and error.code == 400:
        first = error.message.split(" ", 1)[0].strip("`'\":,.")
        param = first if first in ChatCompletionRequest.model_fields else None
    return error.code, error.message, param
