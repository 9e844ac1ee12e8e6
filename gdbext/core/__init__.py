"""Core: paging model, walker, Xen symbol model, renderers. Never imports gdb."""
