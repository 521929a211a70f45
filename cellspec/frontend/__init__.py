"""Front end: ``.cell`` text → Lark parse tree → typed AST → checked cell."""
