"""Scan orders, the index tables that reorder tokens through them, and the selective scan."""
from nas.ops.directions import DIRECTIONS, inverse_scan_order, scan_length, scan_order
from nas.ops.multi_scan import multi_direction_scan
from nas.ops.scan_index import apply_scan, gather_scans, gather_steps, scan_orders, scan_tables, take_steps, undo_scan
from nas.ops.scan_registry import (get_scan, register_scan, registered_scans, registry_inverse_order,
                                   registry_scan_order)
from nas.ops.selective_scan import BACKENDS, selective_scan, selective_scan_ref

__all__ = ["DIRECTIONS", "BACKENDS", "apply_scan", "undo_scan", "scan_order", "scan_orders", "scan_length",
           "inverse_scan_order", "scan_tables", "gather_scans", "gather_steps", "take_steps", "selective_scan", "selective_scan_ref",
           "multi_direction_scan", "register_scan", "get_scan", "registered_scans", "registry_scan_order",
           "registry_inverse_order"]
