"""Tools and environments: the host side of multi-turn rollouts (beside rollouts.py).

  registry  tools (`tools`) and environments (`environment_factory`) by import path
  calls     tool calls parsed from a model turn (hermes, llama3, a hook), run with a timeout
  render    tool responses as tokens, by the tokenizer's chat template
  turns     the loop over the compiled multi-turn phases (sampling.multi_turn)
  host      ToolSampler: all of the above for one rollout
  stats     ToolStats (the tools/ metrics), ToolTurns, completions as TRL conversations
  builtin   built-in tools (calculator)

Kept free of imports here: `config` reads `tools.calls.FORMATS` without the rest.
"""
