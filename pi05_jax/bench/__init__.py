"""`pi05 bench` and `pi05 profile`: how fast each implementation is, and how far from the card's floor.

Modules:
  implementations  find registered implementations, resolve --kernels, wrap phases in named scopes
  selection        the shared command-line selection (model, inputs, kernels) and building it on the device
  hardware         device facts, ceilings measured on this card, published peak specs of other cards
  roofline         hand-counted FLOPs and bytes per phase, the floor, the projection to other hardware
  jaxpr_flops      the matmul FLOPs a traced function really executes (to say what each implementation computes)
  runner           compile, time the one-jit sample and each phase, memory
  startup          cold / warm (persistent compilation cache) start-up, in fresh subprocesses
  report           the stdout table, the JSON document and the PNG chart
  trace            the profiler trace: top kernels by device time and the phase each belongs to
"""
