"""gRPC contracts (`freshrec.proto`) and their generated Python code.

Only adapter modules (`services/gateway/pb.py`) touch the generated messages; every other
package works in its own types. Regenerate with `python -m proto.generate`.
"""
