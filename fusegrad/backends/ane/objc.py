"""ctypes bindings to the Objective-C runtime, Foundation, CoreFoundation and IOSurface (macOS only).

Nothing is loaded at import time, so this module imports on any OS; `Objc()` raises BackendError off
macOS. objc_msgSend is called through a function pointer cast to the exact C signature of each call
(restype, argtypes): on arm64 it is not variadic, so an uncast call would pass arguments wrongly.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_bool, c_char_p, c_int, c_uint32, c_ulong, c_ulonglong, c_void_p

from fusegrad.core.errors import BackendError

LIBOBJC = "/usr/lib/libobjc.A.dylib"
FOUNDATION = "/System/Library/Frameworks/Foundation.framework/Foundation"
COREFOUNDATION = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation"
IOSURFACE = "/System/Library/Frameworks/IOSurface.framework/IOSurface"
LOCK_READ_ONLY = 1  # kIOSurfaceLockReadOnly


def load_library(path: str):
    try:
        return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise BackendError(f"cannot load {path}: {e}") from None


class Objc:
    """Message sending and the few Foundation objects the ANE calls need (NSString, NSData, NSNumber,
    NSDictionary, NSArray), plus IOSurface buffers."""

    def __init__(self):
        self.lib = load_library(LIBOBJC)
        self.foundation = load_library(FOUNDATION)
        self.cf = load_library(COREFOUNDATION)
        self.iosurface = load_library(IOSURFACE)
        self.lib.objc_getClass.restype, self.lib.objc_getClass.argtypes = c_void_p, [c_char_p]
        self.lib.sel_registerName.restype, self.lib.sel_registerName.argtypes = c_void_p, [c_char_p]
        self.lib.objc_autoreleasePoolPush.restype = c_void_p
        self.lib.objc_autoreleasePoolPop.argtypes = [c_void_p]
        self.foundation.NSTemporaryDirectory.restype = c_void_p
        self.cf.CFRelease.argtypes = [c_void_p]
        io = self.iosurface
        io.IOSurfaceCreate.restype, io.IOSurfaceCreate.argtypes = c_void_p, [c_void_p]
        io.IOSurfaceLock.restype, io.IOSurfaceLock.argtypes = c_int, [c_void_p, c_uint32, c_void_p]
        io.IOSurfaceUnlock.restype, io.IOSurfaceUnlock.argtypes = c_int, [c_void_p, c_uint32, c_void_p]
        io.IOSurfaceGetBaseAddress.restype, io.IOSurfaceGetBaseAddress.argtypes = c_void_p, [c_void_p]
        self._msgsend = ctypes.cast(self.lib.objc_msgSend, c_void_p).value
        self._signatures = {}
        self._selectors = {}

    # ---- runtime --------------------------------------------------------------------------------
    def cls(self, name: str) -> int:
        ptr = self.lib.objc_getClass(name.encode())
        if not ptr:
            raise BackendError(f"Objective-C class {name} not found (framework not loaded or API changed)")
        return ptr

    def send(self, receiver, selector: str, *args, restype=c_void_p, argtypes=()):
        """[receiver selector:args...] through objc_msgSend cast to restype (id, SEL, *argtypes)."""
        key = (restype, tuple(argtypes))
        if key not in self._signatures:
            self._signatures[key] = ctypes.CFUNCTYPE(restype, c_void_p, c_void_p, *argtypes)(self._msgsend)
        if selector not in self._selectors:
            self._selectors[selector] = self.lib.sel_registerName(selector.encode())
        return self._signatures[key](receiver, self._selectors[selector], *args)

    def pool_push(self) -> int:
        return self.lib.objc_autoreleasePoolPush()

    def pool_pop(self, pool: int) -> None:
        self.lib.objc_autoreleasePoolPop(pool)

    def retain(self, obj):
        return self.send(obj, "retain")

    def release(self, obj) -> None:
        if obj:
            self.send(obj, "release", restype=None)

    # ---- Foundation objects (autoreleased: create inside a pool, retain what outlives it) ---------
    def string(self, text: str) -> int:
        return self.send(self.cls("NSString"), "stringWithUTF8String:", text.encode(), argtypes=[c_char_p])

    def to_str(self, nsstring) -> str:
        if not nsstring:
            return ""
        return self.send(nsstring, "UTF8String", restype=c_char_p).decode()

    def data(self, payload: bytes) -> int:
        return self.send(self.cls("NSData"), "dataWithBytes:length:", payload, len(payload),
                         argtypes=[c_char_p, c_ulong])

    def number(self, value: int) -> int:
        return self.send(self.cls("NSNumber"), "numberWithUnsignedLongLong:", value, argtypes=[c_ulonglong])

    def array(self, items: list) -> int:
        objs = (c_void_p * len(items))(*items)
        return self.send(self.cls("NSArray"), "arrayWithObjects:count:", objs, len(items),
                         argtypes=[c_void_p, c_ulong])

    def dictionary(self, mapping: dict) -> int:
        """NSDictionary from {key object: value object}."""
        keys = (c_void_p * len(mapping))(*mapping.keys())
        values = (c_void_p * len(mapping))(*mapping.values())
        return self.send(self.cls("NSDictionary"), "dictionaryWithObjects:forKeys:count:", values, keys,
                         len(mapping), argtypes=[c_void_p, c_void_p, c_ulong])

    def temporary_directory(self) -> str:
        return self.to_str(self.foundation.NSTemporaryDirectory())

    def describe_error(self, error: c_void_p) -> str:
        return self.to_str(self.send(error, "description")) if error.value else "no NSError given"

    def call_with_error(self, receiver, selector: str, *args, argtypes=()) -> tuple:
        """BOOL-returning call whose last parameter is NSError**: -> (ok, error description)."""
        error = c_void_p()
        ok = self.send(receiver, selector, *args, ctypes.byref(error), restype=c_bool,
                       argtypes=[*argtypes, POINTER(c_void_p)])
        return bool(ok), ("" if ok else self.describe_error(error))

    # ---- IOSurface ------------------------------------------------------------------------------
    def _cfkey(self, name: str) -> int:
        return c_void_p.in_dll(self.iosurface, name).value

    def surface(self, nbytes: int) -> int:
        """A 1-row IOSurface of `nbytes` bytes (width = bytes, 1 byte per element, pixel format 0)."""
        pool = self.pool_push()
        try:
            props = {self._cfkey("kIOSurfaceWidth"): self.number(nbytes), self._cfkey("kIOSurfaceHeight"): self.number(1),
                     self._cfkey("kIOSurfaceBytesPerElement"): self.number(1),
                     self._cfkey("kIOSurfaceBytesPerRow"): self.number(nbytes),
                     self._cfkey("kIOSurfaceAllocSize"): self.number(nbytes),
                     self._cfkey("kIOSurfacePixelFormat"): self.number(0)}
            ref = self.iosurface.IOSurfaceCreate(self.dictionary(props))
        finally:
            self.pool_pop(pool)
        if not ref:
            raise BackendError(f"IOSurfaceCreate failed for {nbytes} bytes")
        return ref

    def surface_write(self, ref, payload: bytes) -> None:
        self.iosurface.IOSurfaceLock(ref, 0, None)
        try:
            ctypes.memmove(self.iosurface.IOSurfaceGetBaseAddress(ref), payload, len(payload))
        finally:
            self.iosurface.IOSurfaceUnlock(ref, 0, None)

    def surface_read(self, ref, nbytes: int) -> bytes:
        self.iosurface.IOSurfaceLock(ref, LOCK_READ_ONLY, None)
        try:
            return ctypes.string_at(self.iosurface.IOSurfaceGetBaseAddress(ref), nbytes)
        finally:
            self.iosurface.IOSurfaceUnlock(ref, LOCK_READ_ONLY, None)

    def cf_release(self, ref) -> None:
        if ref:
            self.cf.CFRelease(ref)
