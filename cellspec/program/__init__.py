"""The sequence program: one typed plan of a whole sequence, forward and backward, that every
back end renders (:mod:`cellspec.program.ir` the types, :mod:`cellspec.program.plan` the
planner, :mod:`cellspec.program.passes` and :mod:`cellspec.program.save` its passes,
:mod:`cellspec.program.text` the printer behind ``cellspec show --stage program``)."""
