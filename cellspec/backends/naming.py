"""Names in generated code.

Spec names are kept as written wherever the target language allows; a name that is a keyword or
built-in of the target (``lambda``, ``float``, ``np``, ``int``) gets a trailing underscore until it
clashes with nothing. Names the generated code itself needs all start with ``_``, which the
language reserves, so they can never clash with a spec name.
"""

from __future__ import annotations

import builtins
import keyword

PYTHON_RESERVED = (
    set(keyword.kwlist)
    | set(keyword.softkwlist)
    | set(dir(builtins))
    | {"np", "torch", "nn", "F", "math", "self"}
)

C_RESERVED = {
    # C/C++ keywords
    "alignas", "alignof", "and", "and_eq", "asm", "auto", "bitand", "bitor", "bool", "break", "case",
    "catch", "char", "char16_t", "char32_t", "char8_t", "class", "compl", "concept", "const",
    "consteval", "constexpr", "constinit", "const_cast", "continue", "co_await", "co_return",
    "co_yield", "decltype", "default", "delete", "do", "double", "dynamic_cast", "else", "enum",
    "explicit", "export", "extern", "false", "float", "for", "friend", "goto", "if", "inline", "int",
    "long", "mutable", "namespace", "new", "noexcept", "not", "not_eq", "nullptr", "operator", "or",
    "or_eq", "private", "protected", "public", "register", "reinterpret_cast", "requires", "return",
    "short", "signed", "sizeof", "static", "static_assert", "static_cast", "struct", "switch",
    "template", "this", "thread_local", "throw", "true", "try", "typedef", "typeid", "typename",
    "union", "unsigned", "using", "virtual", "void", "volatile", "wchar_t", "while", "xor", "xor_eq",
    "restrict", "main", "NULL",
    # math library and CUDA names a kernel may call or see
    "exp", "expf", "log", "logf", "log1p", "log1pf", "sqrt", "sqrtf", "tanh", "tanhf", "fabs", "fabsf",
    "fmax", "fmaxf", "fmin", "fminf", "pow", "powf", "abs", "min", "max", "std", "size_t", "half",
    "threadIdx", "blockIdx", "blockDim", "gridDim", "warpSize", "dim3", "float2", "float4",
    "__half", "__nv_bfloat16", "scalar_t", "index_t", "real", "out", "in", "assert", "signbit",
    "isnan", "isinf", "copysign", "floor", "ceil", "round", "errno", "stdin", "stdout", "stderr",
}


def mangle(keys: list[str], reserved: set[str]) -> dict[str, str]:
    """Map each key to a code name: itself, or with '_' appended until it is free."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for key in keys:
        if key not in reserved:
            used.add(key)
    for key in keys:
        name = key
        while name in reserved or (name in used and name != key) or name in out.values():
            name += "_"
        out[key] = name
        used.add(name)
    return out
