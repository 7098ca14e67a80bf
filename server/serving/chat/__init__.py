"""Chat completions for Qwen3.5: template rendering, reasoning split, tool calls (docs/chat.md).

``template`` renders messages into the prompt; ``reasoning`` and ``tools`` parse the reply as it
streams (``reply`` chains them); ``protocol`` holds the wire types; ``service`` is the endpoint
without HTTP, on the serving base (``server.serving.base``). For state reuse (docs/state-reuse.md):
``boundaries`` says where a prompt is worth keeping on the phone, ``history`` renders earlier replies
as generated, ``overflow`` drops the oldest turns of a chat that outgrows the context.
"""
