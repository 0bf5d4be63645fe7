"""throttllem: SLO-aware GPU SM-clock control for LLM inference serving."""
