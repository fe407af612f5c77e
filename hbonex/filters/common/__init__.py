"""Code that several filters share (the RBAC policy engine)."""
