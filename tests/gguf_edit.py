"""GGUF files edited for the tests with the gguf package: a valid file with some metadata or tensors changed."""
import gguf


def rewrite(src, dst, tensors=None, metadata=None, arch=None):
    """Copy the GGUF file `src` to `dst` with some tensors replaced or added ({name: (array, gguf type or None)},
    None to drop one) and some metadata replaced or added ({key: (value, GGUFValueType)})."""
    reader, tensors, metadata = gguf.GGUFReader(src), dict(tensors or {}), dict(metadata or {})
    w = gguf.GGUFWriter(dst, arch or reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture" and key not in metadata:
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, (value, kind) in metadata.items():
        w.add_key_value(key, value, kind)
    for t in reader.tensors:
        if t.name not in tensors:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, given in tensors.items():
        if given is not None:
            w.add_tensor(name, given[0], raw_dtype=given[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
