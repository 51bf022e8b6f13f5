"""What the command line prints when something fails: one line saying what to do next.

Used by `qwen2vl` (cli.py, for any command) and by the interactive chat (chat_cli.py), where one
bad turn prints its line and the chat goes on.
"""


def explain(e: Exception) -> str:
    """One line for an exception, with the next step when we know it."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, MemoryError) or "OutOfMemoryError" in type(e).__name__:
        return (f"out of memory ({text[:200]}); try --dtype bfloat16, a smaller --max-pixels or --kv-cache-gib, "
                "or a smaller model")
    if isinstance(e, (FileNotFoundError, ConnectionError, ValueError)):
        return text  # our own messages already say what to do
    return f"{type(e).__name__}: {text} (set QWEN2VL_DEBUG=1 for the traceback)"
