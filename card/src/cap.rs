//! JavaCard CAP files: this module owns reading a converter's CAP (ZIP) into
//! validated components ([`CapFile`]), building the GlobalPlatform load file
//! from them (raw, C4-wrapped, and its SHA-256), splitting a received load
//! file back into components on the card side ([`components_of_load_file`],
//! used by the emulator), and writing structurally valid CAP files for demo
//! firmware and test fixtures ([`CapBuilder`]).
//!
//! Self-contained on purpose: std, `zip`, `sha2`, `hex` and `thiserror` only.
//!
//! Only the compact CAP format (2.1, 2.2 and 2.3 without static resources) is
//! understood; the extended format of JavaCard 3.1 is rejected with
//! [`CapError::Unsupported`].

use std::fmt;
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;
use zip::result::ZipError;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipArchive, ZipWriter};

/// The `magic` item that opens every Header component.
pub const CAP_MAGIC: u32 = 0xDECA_FFED;

/// Header `flags` bit: the package uses the `int` type.
pub const ACC_INT: u8 = 0x01;
/// Header `flags` bit: the CAP file has an Export component.
pub const ACC_EXPORT: u8 = 0x02;
/// Header `flags` bit: the CAP file has an Applet component.
pub const ACC_APPLET: u8 = 0x04;
/// Header `flags` bit: extended CAP format (JavaCard 3.1); not supported here.
pub const ACC_EXTENDED: u8 = 0x08;

/// The largest component a compact CAP file can hold: tag, u2 size, and
/// 65535 bytes of info.
pub const MAX_COMPONENT_LEN: usize = 3 + u16::MAX as usize;

/// AID of the `java/lang` package, which every CAP file imports.
pub const JAVA_LANG_AID: [u8; 7] = [0xA0, 0x00, 0x00, 0x00, 0x62, 0x00, 0x01];

/// The GlobalPlatform tag of the Load File Data Block.
pub const LOAD_FILE_DATA_BLOCK_TAG: u8 = 0xC4;

/// The components of a compact CAP file, with their tags as discriminants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ComponentKind {
    /// `Header.cap`: magic, CAP format version, flags, package AID, version and name.
    Header = 1,
    /// `Directory.cap`: the sizes of all components and a few counts.
    Directory = 2,
    /// `Applet.cap`: the applets defined by the package (optional).
    Applet = 3,
    /// `Import.cap`: the packages this package links against.
    Import = 4,
    /// `ConstantPool.cap`.
    ConstantPool = 5,
    /// `Class.cap`.
    Class = 6,
    /// `Method.cap`: the bytecode.
    Method = 7,
    /// `StaticField.cap`.
    StaticField = 8,
    /// `RefLocation.cap`.
    RefLocation = 9,
    /// `Export.cap`: present only for library packages that export symbols (optional).
    Export = 10,
    /// `Descriptor.cap`: present in the CAP file, optional when loading.
    Descriptor = 11,
    /// `Debug.cap`: never loaded onto a card (optional, CAP 2.2+).
    Debug = 12,
}

impl ComponentKind {
    /// All twelve kinds, in tag order.
    pub const ALL: [ComponentKind; 12] = [
        ComponentKind::Header,
        ComponentKind::Directory,
        ComponentKind::Applet,
        ComponentKind::Import,
        ComponentKind::ConstantPool,
        ComponentKind::Class,
        ComponentKind::Method,
        ComponentKind::StaticField,
        ComponentKind::RefLocation,
        ComponentKind::Export,
        ComponentKind::Descriptor,
        ComponentKind::Debug,
    ];

    /// The components a CAP file must contain to be loadable.
    pub const MANDATORY: [ComponentKind; 8] = [
        ComponentKind::Header,
        ComponentKind::Directory,
        ComponentKind::Import,
        ComponentKind::Class,
        ComponentKind::Method,
        ComponentKind::StaticField,
        ComponentKind::ConstantPool,
        ComponentKind::RefLocation,
    ];

    /// The GlobalPlatform load order; [`ComponentKind::Descriptor`] (last) is
    /// only sent when asked for, absent optional components are skipped.
    pub const LOAD_ORDER: [ComponentKind; 11] = [
        ComponentKind::Header,
        ComponentKind::Directory,
        ComponentKind::Import,
        ComponentKind::Applet,
        ComponentKind::Class,
        ComponentKind::Method,
        ComponentKind::StaticField,
        ComponentKind::Export,
        ComponentKind::ConstantPool,
        ComponentKind::RefLocation,
        ComponentKind::Descriptor,
    ];

    /// The component's tag byte (its first byte).
    pub const fn tag(self) -> u8 {
        self as u8
    }

    /// The kind with this tag, if it is one of the twelve standard ones.
    pub const fn from_tag(tag: u8) -> Option<ComponentKind> {
        match tag {
            1..=12 => Some(ComponentKind::ALL[(tag - 1) as usize]),
            _ => None,
        }
    }

    /// The component's name, e.g. `"ConstantPool"`.
    pub const fn name(self) -> &'static str {
        match self {
            ComponentKind::Header => "Header",
            ComponentKind::Directory => "Directory",
            ComponentKind::Applet => "Applet",
            ComponentKind::Import => "Import",
            ComponentKind::ConstantPool => "ConstantPool",
            ComponentKind::Class => "Class",
            ComponentKind::Method => "Method",
            ComponentKind::StaticField => "StaticField",
            ComponentKind::RefLocation => "RefLocation",
            ComponentKind::Export => "Export",
            ComponentKind::Descriptor => "Descriptor",
            ComponentKind::Debug => "Debug",
        }
    }

    /// The component's file name inside `<package>/javacard/`, e.g. `"Header.cap"`.
    pub const fn file_name(self) -> &'static str {
        match self {
            ComponentKind::Header => "Header.cap",
            ComponentKind::Directory => "Directory.cap",
            ComponentKind::Applet => "Applet.cap",
            ComponentKind::Import => "Import.cap",
            ComponentKind::ConstantPool => "ConstantPool.cap",
            ComponentKind::Class => "Class.cap",
            ComponentKind::Method => "Method.cap",
            ComponentKind::StaticField => "StaticField.cap",
            ComponentKind::RefLocation => "RefLocation.cap",
            ComponentKind::Export => "Export.cap",
            ComponentKind::Descriptor => "Descriptor.cap",
            ComponentKind::Debug => "Debug.cap",
        }
    }

    /// The kind whose file name is exactly `file_name` (case-sensitive, no
    /// directory part), e.g. `"Method.cap"`.
    pub fn from_file_name(file_name: &str) -> Option<ComponentKind> {
        ComponentKind::ALL.into_iter().find(|kind| kind.file_name() == file_name)
    }

    /// Whether a loadable CAP file must contain this component.
    pub fn is_mandatory(self) -> bool {
        ComponentKind::MANDATORY.contains(&self)
    }

    fn index(self) -> usize {
        usize::from(self.tag() - 1)
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One applet from the Applet component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppletInfo {
    /// The applet's AID (5..=16 bytes).
    pub aid: Vec<u8>,
    /// Offset of its `install` method in the info item of the Method component.
    pub install_method_offset: u16,
}

/// One package from the Import component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedPackage {
    /// The imported package's AID (5..=16 bytes).
    pub aid: Vec<u8>,
    /// The version linked against, `(major, minor)`.
    pub version: (u8, u8),
}

/// Everything that can be wrong with a CAP file (or with [`CapBuilder`] input).
/// Each variant names the component and field at fault.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CapError {
    /// The file could not be read from disk.
    #[error("cannot read CAP file {}: {source}", path.display())]
    Io {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The input is not a readable ZIP archive.
    #[error("not a readable ZIP archive: {0}")]
    Zip(#[source] ZipError),
    /// [`CapBuilder`] could not write its ZIP archive.
    #[error("cannot write the CAP archive: {0}")]
    ZipWrite(#[source] ZipError),
    /// A component entry of the ZIP could not be decompressed.
    #[error("ZIP entry {entry}: {source}")]
    ZipEntry {
        /// The entry's name in the archive.
        entry: String,
        /// The underlying error.
        #[source]
        source: ZipError,
    },
    /// A required component is not in the archive.
    #[error("{kind} component ({file}) is missing", file = kind.file_name())]
    MissingComponent {
        /// The missing component.
        kind: ComponentKind,
    },
    /// The same component appears twice in the archive.
    #[error("{kind} component appears twice in the archive: {first} and {second}")]
    DuplicateComponent {
        /// The duplicated component.
        kind: ComponentKind,
        /// The first entry name.
        first: String,
        /// The second entry name.
        second: String,
    },
    /// Components come from more than one `<package>/javacard/` directory.
    #[error("components from more than one package directory in the archive: {first:?} and {second:?}")]
    MixedPackages {
        /// The first package directory seen.
        first: String,
        /// Another package directory.
        second: String,
    },
    /// A component entry is bigger than any compact component can be.
    #[error("{kind} component ({entry}) is larger than the {max} bytes a u2 size allows")]
    ComponentTooLarge {
        /// The component.
        kind: ComponentKind,
        /// The entry's name in the archive.
        entry: String,
        /// The limit, [`MAX_COMPONENT_LEN`].
        max: usize,
    },
    /// A component's tag byte does not match its file name.
    #[error("{kind} component ({file}): tag byte is {found:#04x}, expected {expected:#04x}", file = kind.file_name())]
    WrongTag {
        /// The component, as named by its file.
        kind: ComponentKind,
        /// Its tag.
        expected: u8,
        /// The first byte found.
        found: u8,
    },
    /// A component's u2 size field does not match its length.
    #[error("{kind} component: size field says {declared} bytes of info, but {actual} bytes follow the tag and size")]
    SizeMismatch {
        /// The component.
        kind: ComponentKind,
        /// The u2 size field.
        declared: usize,
        /// The bytes actually present after the 3-byte prefix.
        actual: usize,
    },
    /// A component ends in the middle of a field.
    #[error("{kind} component: truncated in {field} at offset {offset}: needs {needed} bytes, {available} left")]
    Truncated {
        /// The component.
        kind: ComponentKind,
        /// The field being read.
        field: &'static str,
        /// Offset of the field from the component's first (tag) byte.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the component.
        available: usize,
    },
    /// A field holds a value it must not.
    #[error("{kind} component: {field}: expected {expected}, found {found}")]
    InvalidField {
        /// The component.
        kind: ComponentKind,
        /// The field.
        field: &'static str,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A component has bytes left over after its last field.
    #[error("{kind} component: {count} unexpected bytes after {after} at offset {offset}")]
    TrailingBytes {
        /// The component.
        kind: ComponentKind,
        /// The last field parsed.
        after: &'static str,
        /// Offset of the first extra byte from the component's first byte.
        offset: usize,
        /// How many extra bytes.
        count: usize,
    },
    /// The Directory component disagrees with the components present.
    #[error("Directory component lists {kind} as {directory} bytes, but {found}")]
    DirectoryMismatch {
        /// The component whose size disagrees.
        kind: ComponentKind,
        /// The size the Directory lists.
        directory: usize,
        /// What the archive holds instead.
        found: String,
    },
    /// A raw load file does not split into components in GlobalPlatform order.
    #[error("load file, offset {offset}: {reason}")]
    LoadFile {
        /// Offset in the load file (the value of the C4 TLV).
        offset: usize,
        /// What is wrong there.
        reason: String,
    },
    /// A CAP format or feature this module does not handle.
    #[error("unsupported CAP file (format {}.{}): {reason}", .version.0, .version.1)]
    Unsupported {
        /// The CAP format version from the Header, `(major, minor)`.
        version: (u8, u8),
        /// What is not supported.
        reason: String,
    },
    /// [`CapBuilder`] was given something it cannot encode.
    #[error("cannot build CAP file: {field}: {reason}")]
    InvalidInput {
        /// The builder input at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// A parsed, validated CAP file.
///
/// Holds the identity of the package (from the Header), its applets (from the
/// Applet component) and imports, and every component's raw bytes (tag and
/// u2 size included) for building the load file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapFile {
    package_path: String,
    header: CapHeader,
    applets: Vec<AppletInfo>,
    imports: Vec<ImportedPackage>,
    components: [Option<Vec<u8>>; 12],
}

impl CapFile {
    /// Reads and validates a CAP file from disk; see [`CapFile::from_bytes`].
    pub fn from_path(path: impl AsRef<Path>) -> Result<CapFile, CapError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| CapError::Io { path: path.to_path_buf(), source })?;
        CapFile::from_bytes(&bytes)
    }

    /// Parses and validates a CAP file (a ZIP archive).
    ///
    /// Components are the entries named `<package path>/javacard/<Kind>.cap`
    /// (see [`ComponentKind::file_name`]); every other entry (`META-INF/`,
    /// `.exp` files, classes, unknown `.cap` names) is ignored. Checks: the
    /// mandatory components ([`ComponentKind::MANDATORY`]) are present, each
    /// component's tag matches its file name and its u2 size its length, the
    /// Header's magic, format (compact 2.x), package AID (5..=16 bytes) and
    /// flags, the Import and Applet components' structure, and that the
    /// Directory's sizes and counts agree with the components present (a
    /// Directory may list a Descriptor or Debug component that was stripped).
    /// Never panics, whatever the input.
    pub fn from_bytes(bytes: &[u8]) -> Result<CapFile, CapError> {
        let mut archive = ZipArchive::new(Cursor::new(bytes)).map_err(CapError::Zip)?;

        // Find component entries by name first, so that unrelated entries are
        // never decompressed.
        let mut wanted: Vec<(usize, String, String, ComponentKind)> = Vec::new();
        for (index, raw_name) in archive.file_names_raw().enumerate() {
            let name = String::from_utf8_lossy(raw_name);
            if let Some((package_path, kind)) = component_entry(&name) {
                let package_path = package_path.to_owned();
                wanted.push((index, name.into_owned(), package_path, kind));
            }
        }

        let mut package_path: Option<String> = None;
        let mut components: [Option<Vec<u8>>; 12] = Default::default();
        let mut entry_names: [Option<String>; 12] = Default::default();
        for (index, name, path, kind) in wanted {
            match &package_path {
                None => package_path = Some(path),
                Some(first) if *first != path => {
                    return Err(CapError::MixedPackages { first: first.clone(), second: path });
                }
                Some(_) => {}
            }
            if let Some(first) = &entry_names[kind.index()] {
                return Err(CapError::DuplicateComponent { kind, first: first.clone(), second: name });
            }
            let data = read_entry(&mut archive, index, &name, kind)?;
            components[kind.index()] = Some(data);
            entry_names[kind.index()] = Some(name);
        }

        let package_path = package_path.ok_or(CapError::MissingComponent { kind: ComponentKind::Header })?;
        CapFile::from_components(package_path, components)
    }

    /// Parses and validates a raw load file, as a card receives it inside the
    /// C4 TLV ([`CapFile::load_file`]), with the same checks as
    /// [`CapFile::from_bytes`]. [`CapFile::package_path`] is empty.
    pub fn from_load_file(load_file: &[u8]) -> Result<CapFile, CapError> {
        let parts = components_of_load_file(load_file)?;
        let mut components: [Option<Vec<u8>>; 12] = Default::default();
        for (kind, data) in parts.iter() {
            components[kind.index()] = Some(data.to_vec());
        }
        CapFile::from_components(String::new(), components)
    }

    /// Validates components (indexed by tag - 1) and extracts the package
    /// identity; the ZIP-independent half of [`CapFile::from_bytes`].
    fn from_components(package_path: String, components: [Option<Vec<u8>>; 12]) -> Result<CapFile, CapError> {
        // Envelope of every component: tag and u2 size.
        for kind in ComponentKind::ALL {
            if let Some(data) = &components[kind.index()] {
                check_envelope(kind, data)?;
            }
        }
        let get = |kind: ComponentKind| components[kind.index()].as_deref();

        let header = get(ComponentKind::Header).ok_or(CapError::MissingComponent { kind: ComponentKind::Header })?;
        let header = parse_header(header)?;

        for kind in ComponentKind::MANDATORY {
            if get(kind).is_none() {
                return Err(CapError::MissingComponent { kind });
            }
        }

        check_flag(
            header.flags,
            ACC_APPLET,
            "flags ACC_APPLET (0x04)",
            get(ComponentKind::Applet).is_some(),
            ComponentKind::Applet,
        )?;
        check_flag(
            header.flags,
            ACC_EXPORT,
            "flags ACC_EXPORT (0x02)",
            get(ComponentKind::Export).is_some(),
            ComponentKind::Export,
        )?;

        let imports = match get(ComponentKind::Import) {
            Some(data) => parse_import(data)?,
            None => Vec::new(),
        };
        let method_info_len = get(ComponentKind::Method).map_or(0, |m| m.len() - 3);
        let applets = match get(ComponentKind::Applet) {
            Some(data) => parse_applet(data, method_info_len)?,
            None => Vec::new(),
        };
        if let Some(directory) = get(ComponentKind::Directory) {
            check_directory(directory, header.format_version, &components, imports.len(), applets.len())?;
        }

        Ok(CapFile { package_path, header, applets, imports, components })
    }

    /// The parsed Header component.
    pub fn header(&self) -> &CapHeader {
        &self.header
    }

    /// The package AID from the Header (5..=16 bytes).
    pub fn package_aid(&self) -> &[u8] {
        &self.header.package_aid
    }

    /// The package version from the Header, `(major, minor)`.
    pub fn package_version(&self) -> (u8, u8) {
        self.header.package_version
    }

    /// The package name in internal form (`"im/status/keycard/math"`), from
    /// the Header's `package_name_info`: CAP 2.2+ only, `None` when absent or empty.
    pub fn package_name(&self) -> Option<&str> {
        self.header.package_name.as_deref()
    }

    /// The directory holding `javacard/` in the archive (`"testapplets/empty"`;
    /// empty when the components sit in a top-level `javacard/`).
    pub fn package_path(&self) -> &str {
        &self.package_path
    }

    /// The CAP format version from the Header, `(major, minor)`: (2, 1),
    /// (2, 2) or (2, 3).
    pub fn format_version(&self) -> (u8, u8) {
        self.header.format_version
    }

    /// The Header's `flags` ([`ACC_INT`], [`ACC_EXPORT`], [`ACC_APPLET`]).
    pub fn flags(&self) -> u8 {
        self.header.flags
    }

    /// The applets from the Applet component, in order; empty for a library package.
    pub fn applets(&self) -> &[AppletInfo] {
        &self.applets
    }

    /// The applet AIDs, in Applet-component order.
    pub fn applet_aids(&self) -> Vec<&[u8]> {
        self.applets.iter().map(|a| a.aid.as_slice()).collect()
    }

    /// The packages from the Import component.
    pub fn imports(&self) -> &[ImportedPackage] {
        &self.imports
    }

    /// A component's raw bytes (tag and u2 size included), if present.
    pub fn component(&self, kind: ComponentKind) -> Option<&[u8]> {
        self.components[kind.index()].as_deref()
    }

    /// All present components in tag order, with their raw bytes.
    pub fn components(&self) -> impl Iterator<Item = (ComponentKind, &[u8])> {
        ComponentKind::ALL.into_iter().filter_map(|kind| self.component(kind).map(|data| (kind, data)))
    }

    /// Whether the archive has a Descriptor component (some tools strip it).
    pub fn has_descriptor(&self) -> bool {
        self.component(ComponentKind::Descriptor).is_some()
    }

    fn load_components(&self, with_descriptor: bool) -> impl Iterator<Item = &[u8]> {
        ComponentKind::LOAD_ORDER
            .into_iter()
            .filter(move |kind| with_descriptor || *kind != ComponentKind::Descriptor)
            .filter_map(|kind| self.component(kind))
    }

    /// The length of [`CapFile::load_file`], without building it.
    pub fn load_file_len(&self, with_descriptor: bool) -> usize {
        self.load_components(with_descriptor).map(<[u8]>::len).sum()
    }

    /// The load file: the components concatenated in GlobalPlatform order
    /// ([`ComponentKind::LOAD_ORDER`]: Header, Directory, Import, Applet,
    /// Class, Method, StaticField, Export, ConstantPool, RefLocation), then
    /// Descriptor when `with_descriptor` and present. Absent optional
    /// components are skipped; Debug is never included.
    pub fn load_file(&self, with_descriptor: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.load_file_len(with_descriptor));
        for data in self.load_components(with_descriptor) {
            out.extend_from_slice(data);
        }
        out
    }

    /// The load file wrapped as a TLV: tag `C4`, BER-TLV length (one byte
    /// below 128, else `81 xx`, `82 xxxx`, `83 xxxxxx`), then
    /// [`CapFile::load_file`]. This is the byte stream that gets split into
    /// the data fields of successive LOAD commands.
    pub fn load_file_data_block(&self, with_descriptor: bool) -> Vec<u8> {
        let len = self.load_file_len(with_descriptor);
        let mut out = Vec::with_capacity(len + 5);
        out.push(LOAD_FILE_DATA_BLOCK_TAG);
        push_ber_length(&mut out, len);
        for data in self.load_components(with_descriptor) {
            out.extend_from_slice(data);
        }
        out
    }

    /// SHA-256 over the raw [`CapFile::load_file`] (the concatenated
    /// components, *without* the `C4` tag and length). This is the value
    /// GlobalPlatform tools call the Load File Data Block Hash (INSTALL [for
    /// load], DAP); for the reference `Empty` applet without Descriptor it
    /// starts `8d5ac9e2`, whereas hashing the C4-wrapped block would not.
    pub fn load_file_sha256(&self, with_descriptor: bool) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for data in self.load_components(with_descriptor) {
            hasher.update(data);
        }
        hasher.finalize().into()
    }
}

/// The components of a raw load file (the value of the C4 TLV), as split by
/// [`components_of_load_file`]; borrows the load file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadFileComponents<'a> {
    components: Vec<(ComponentKind, &'a [u8])>,
}

/// Splits a raw load file (the value of the C4 TLV, i.e. [`CapFile::load_file`])
/// into its components: the card side of loading. Checks that every component
/// is complete (tag, u2 size, info), that the tags come in GlobalPlatform load
/// order ([`ComponentKind::LOAD_ORDER`]) without repeats, that nothing else
/// (Debug, unknown tags, stray bytes) is there and that the mandatory
/// components are present. The Header and Applet components are only decoded
/// on demand ([`LoadFileComponents::header`], [`LoadFileComponents::applet_aids`]);
/// [`CapFile::from_load_file`] does the full validation.
pub fn components_of_load_file(load_file: &[u8]) -> Result<LoadFileComponents<'_>, CapError> {
    let mut components: Vec<(ComponentKind, &[u8])> = Vec::new();
    let mut offset = 0;
    let mut next_position = 0; // index into LOAD_ORDER the next component may take
    while offset < load_file.len() {
        let rest = &load_file[offset..];
        let tag = rest[0];
        let position = ComponentKind::LOAD_ORDER.iter().position(|kind| kind.tag() == tag);
        let Some(position) = position else {
            let what = match ComponentKind::from_tag(tag) {
                Some(kind) => {
                    format!("{kind} component (tag {tag:#04x}) is never part of a load file")
                }
                None => format!("unknown component tag {tag:#04x}"),
            };
            return Err(CapError::LoadFile { offset, reason: what });
        };
        let kind = ComponentKind::LOAD_ORDER[position];
        if position < next_position {
            let previous = components.last().map_or("", |(k, _)| k.name());
            return Err(CapError::LoadFile {
                offset,
                reason: format!("{kind} component after {previous}: repeated or out of GlobalPlatform load order"),
            });
        }
        let Some(&[hi, lo]) = rest.get(1..3) else {
            return Err(CapError::LoadFile { offset, reason: format!("{kind} component: truncated in its u2 size") });
        };
        let size = usize::from(u16::from_be_bytes([hi, lo]));
        let Some(data) = rest.get(..3 + size) else {
            return Err(CapError::LoadFile {
                offset,
                reason: format!("{kind} component: size says {size} bytes of info, only {} left", rest.len() - 3),
            });
        };
        components.push((kind, data));
        offset += data.len();
        next_position = position + 1;
    }
    for kind in ComponentKind::MANDATORY {
        if !components.iter().any(|(k, _)| *k == kind) {
            return Err(CapError::MissingComponent { kind });
        }
    }
    Ok(LoadFileComponents { components })
}

impl<'a> LoadFileComponents<'a> {
    /// A component's raw bytes (tag and u2 size included), if present.
    pub fn component(&self, kind: ComponentKind) -> Option<&'a [u8]> {
        self.components.iter().find(|(k, _)| *k == kind).map(|(_, data)| *data)
    }

    /// The components in load-file order.
    pub fn iter(&self) -> impl Iterator<Item = (ComponentKind, &'a [u8])> + '_ {
        self.components.iter().copied()
    }

    /// Decodes the Header component (magic, format, package AID 5..=16
    /// bytes, version and name).
    pub fn header(&self) -> Result<CapHeader, CapError> {
        let data =
            self.component(ComponentKind::Header).ok_or(CapError::MissingComponent { kind: ComponentKind::Header })?;
        parse_header(data)
    }

    /// The applet AIDs from the Applet component (install offsets checked
    /// against the Method component); empty when there is no Applet
    /// component (a library package).
    pub fn applet_aids(&self) -> Result<Vec<Vec<u8>>, CapError> {
        let Some(applet) = self.component(ComponentKind::Applet) else {
            return Ok(Vec::new());
        };
        let method_info_len = self.component(ComponentKind::Method).map_or(0, |m| m.len() - 3);
        Ok(parse_applet(applet, method_info_len)?.into_iter().map(|a| a.aid).collect())
    }
}

/// If `name` is `<path>/javacard/<Kind>.cap` (or `javacard/<Kind>.cap`),
/// returns the package path and the kind.
fn component_entry(name: &str) -> Option<(&str, ComponentKind)> {
    let (dir, file) = name.rsplit_once('/')?;
    let kind = ComponentKind::from_file_name(file)?;
    if dir == "javacard" {
        return Some(("", kind));
    }
    let package_path = dir.strip_suffix("/javacard")?;
    Some((package_path, kind))
}

fn read_entry(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    index: usize,
    name: &str,
    kind: ComponentKind,
) -> Result<Vec<u8>, CapError> {
    let entry_error = |source: ZipError| CapError::ZipEntry { entry: name.to_owned(), source };
    let file = archive.by_index(index).map_err(entry_error)?;
    let mut data = Vec::new();
    // One byte more than the limit, to detect oversize entries without
    // trusting the archive's declared sizes.
    file.take(MAX_COMPONENT_LEN as u64 + 1).read_to_end(&mut data).map_err(|e| entry_error(ZipError::Io(e)))?;
    if data.len() > MAX_COMPONENT_LEN {
        return Err(CapError::ComponentTooLarge { kind, entry: name.to_owned(), max: MAX_COMPONENT_LEN });
    }
    Ok(data)
}

fn check_envelope(kind: ComponentKind, data: &[u8]) -> Result<(), CapError> {
    let Some((&tag, rest)) = data.split_first() else {
        return Err(CapError::Truncated { kind, field: "tag", offset: 0, needed: 1, available: 0 });
    };
    if tag != kind.tag() {
        return Err(CapError::WrongTag { kind, expected: kind.tag(), found: tag });
    }
    let [hi, lo, info @ ..] = rest else {
        return Err(CapError::Truncated { kind, field: "size", offset: 1, needed: 2, available: rest.len() });
    };
    let declared = usize::from(u16::from_be_bytes([*hi, *lo]));
    if declared != info.len() {
        return Err(CapError::SizeMismatch { kind, declared, actual: info.len() });
    }
    Ok(())
}

fn check_flag(flags: u8, bit: u8, field: &'static str, present: bool, kind: ComponentKind) -> Result<(), CapError> {
    let set = flags & bit != 0;
    if set == present {
        return Ok(());
    }
    let (expected, found) = if present {
        (format!("set, since {} is present", kind.file_name()), "clear")
    } else {
        (format!("clear, since {} is absent", kind.file_name()), "set")
    };
    Err(CapError::InvalidField { kind: ComponentKind::Header, field, expected, found: found.to_owned() })
}

/// Reads the info item of one component (already envelope-checked), with
/// error messages naming the component, field and offset.
struct Fields<'a> {
    kind: ComponentKind,
    info: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    /// Starts after the 3-byte tag and size of `data`.
    fn new(kind: ComponentKind, data: &'a [u8]) -> Fields<'a> {
        Fields { kind, info: data.get(3..).unwrap_or_default(), pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.info.len() - self.pos
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CapError> {
        let out = self.info.get(self.pos..).and_then(|rest| rest.get(..n)).ok_or(CapError::Truncated {
            kind: self.kind,
            field,
            offset: self.pos + 3,
            needed: n,
            available: self.remaining(),
        })?;
        self.pos += n;
        Ok(out)
    }

    fn u1(&mut self, field: &'static str) -> Result<u8, CapError> {
        Ok(self.bytes(1, field)?[0])
    }

    fn u2(&mut self, field: &'static str) -> Result<u16, CapError> {
        let b = self.bytes(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u4(&mut self, field: &'static str) -> Result<u32, CapError> {
        let b = self.bytes(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `u1 length; u1 aid[length]` pair with `length` in 5..=16.
    fn aid(&mut self, length_field: &'static str, aid_field: &'static str) -> Result<Vec<u8>, CapError> {
        let len = self.u1(length_field)?;
        if !(5..=16).contains(&len) {
            return Err(CapError::InvalidField {
                kind: self.kind,
                field: length_field,
                expected: "5..=16".to_owned(),
                found: len.to_string(),
            });
        }
        Ok(self.bytes(usize::from(len), aid_field)?.to_vec())
    }

    fn finish(self, after: &'static str) -> Result<(), CapError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(CapError::TrailingBytes { kind: self.kind, after, offset: self.pos + 3, count: self.remaining() })
        }
    }
}

/// The contents of a Header component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapHeader {
    /// CAP format version, `(major, minor)`, e.g. `(2, 2)`.
    pub format_version: (u8, u8),
    /// [`ACC_INT`], [`ACC_EXPORT`], [`ACC_APPLET`].
    pub flags: u8,
    /// The package AID (5..=16 bytes).
    pub package_aid: Vec<u8>,
    /// The package version, `(major, minor)`.
    pub package_version: (u8, u8),
    /// The package name in internal form (`"tapline/wallet"`): CAP 2.2+
    /// `package_name_info`, `None` when absent or empty.
    pub package_name: Option<String>,
}

/// Parses a Header component (tag and size included; the envelope must
/// already have been checked).
fn parse_header(data: &[u8]) -> Result<CapHeader, CapError> {
    let kind = ComponentKind::Header;
    let mut f = Fields::new(kind, data);
    let magic = f.u4("magic")?;
    if magic != CAP_MAGIC {
        return Err(CapError::InvalidField {
            kind,
            field: "magic",
            expected: format!("{CAP_MAGIC:08X}"),
            found: format!("{magic:08X}"),
        });
    }
    let minor = f.u1("CAP_format_minor_version")?;
    let major = f.u1("CAP_format_major_version")?;
    let format_version = (major, minor);
    if major != 2 || !(1..=3).contains(&minor) {
        return Err(CapError::Unsupported {
            version: format_version,
            reason: "only compact CAP formats 2.1, 2.2 and 2.3 are understood".to_owned(),
        });
    }
    let flags = f.u1("flags")?;
    if flags & ACC_EXTENDED != 0 {
        return Err(CapError::Unsupported {
            version: format_version,
            reason: "extended CAP format (Header flag ACC_EXTENDED)".to_owned(),
        });
    }
    let package_minor = f.u1("package_info.minor_version")?;
    let package_major = f.u1("package_info.major_version")?;
    let package_aid = f.aid("package_info.AID_length", "package_info.AID")?;
    let mut package_name = None;
    if minor >= 2 && f.remaining() > 0 {
        let len = f.u1("package_name_info.name_length")?;
        let name = f.bytes(usize::from(len), "package_name_info.name")?;
        if !name.is_empty() {
            let name = String::from_utf8(name.to_vec()).map_err(|_| CapError::InvalidField {
                kind,
                field: "package_name_info.name",
                expected: "UTF-8 text".to_owned(),
                found: hex::encode(name),
            })?;
            package_name = Some(name);
        }
    }
    f.finish(if minor >= 2 { "package_name_info" } else { "package_info" })?;
    Ok(CapHeader { format_version, flags, package_aid, package_version: (package_major, package_minor), package_name })
}

fn parse_import(data: &[u8]) -> Result<Vec<ImportedPackage>, CapError> {
    let mut f = Fields::new(ComponentKind::Import, data);
    let count = f.u1("count")?;
    let mut imports = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let minor = f.u1("packages[].minor_version")?;
        let major = f.u1("packages[].major_version")?;
        let aid = f.aid("packages[].AID_length", "packages[].AID")?;
        imports.push(ImportedPackage { aid, version: (major, minor) });
    }
    f.finish("packages")?;
    Ok(imports)
}

fn parse_applet(data: &[u8], method_info_len: usize) -> Result<Vec<AppletInfo>, CapError> {
    let kind = ComponentKind::Applet;
    let mut f = Fields::new(kind, data);
    let count = f.u1("count")?;
    if count == 0 {
        return Err(CapError::InvalidField {
            kind,
            field: "count",
            expected: "at least 1 applet".to_owned(),
            found: "0".to_owned(),
        });
    }
    let mut applets = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let aid = f.aid("applets[].AID_length", "applets[].AID")?;
        let install_method_offset = f.u2("applets[].install_method_offset")?;
        if usize::from(install_method_offset) >= method_info_len {
            return Err(CapError::InvalidField {
                kind,
                field: "applets[].install_method_offset",
                expected: format!("an offset inside the Method component's {method_info_len}-byte info"),
                found: format!("{install_method_offset} (applet {})", hex::encode_upper(&aid)),
            });
        }
        applets.push(AppletInfo { aid, install_method_offset });
    }
    f.finish("applets")?;
    Ok(applets)
}

fn check_directory(
    data: &[u8],
    format: (u8, u8),
    components: &[Option<Vec<u8>>; 12],
    import_count: usize,
    applet_count: usize,
) -> Result<(), CapError> {
    let kind = ComponentKind::Directory;
    let mut f = Fields::new(kind, data);
    // CAP 2.1 lists 11 components, 2.2 adds Debug, 2.3 adds a u4 size of the
    // Static Resource component.
    let listed = if format.1 >= 2 { 12 } else { 11 };
    for listed_kind in &ComponentKind::ALL[..listed] {
        let directory = usize::from(f.u2("component_sizes")?);
        let actual = components[listed_kind.index()].as_ref().map(|c| c.len() - 3);
        let found = match actual {
            Some(actual) if actual == directory => continue,
            Some(actual) => format!("the {listed_kind} component has {actual} bytes"),
            // Descriptor and Debug may be stripped from a CAP file meant for loading.
            None if directory == 0 => continue,
            None if matches!(listed_kind, ComponentKind::Descriptor | ComponentKind::Debug) => {
                continue;
            }
            None => format!("the archive has no {}", listed_kind.file_name()),
        };
        return Err(CapError::DirectoryMismatch { kind: *listed_kind, directory, found });
    }
    if format.1 >= 3 {
        let static_resources = f.u4("component_sizes.Static_Resource_Component_Size")?;
        if static_resources != 0 {
            return Err(CapError::Unsupported {
                version: format,
                reason: format!("a Static Resource component ({static_resources} bytes)"),
            });
        }
    }
    f.u2("static_field_size.image_size")?;
    f.u2("static_field_size.array_init_count")?;
    f.u2("static_field_size.array_init_size")?;
    let imports = f.u1("import_count")?;
    if usize::from(imports) != import_count {
        return Err(CapError::InvalidField {
            kind,
            field: "import_count",
            expected: format!("{import_count} (packages in the Import component)"),
            found: imports.to_string(),
        });
    }
    let applets = f.u1("applet_count")?;
    if usize::from(applets) != applet_count {
        return Err(CapError::InvalidField {
            kind,
            field: "applet_count",
            expected: format!("{applet_count} (applets in the Applet component)"),
            found: applets.to_string(),
        });
    }
    let custom_count = f.u1("custom_count")?;
    for _ in 0..custom_count {
        f.u1("custom_components[].component_tag")?;
        f.u2("custom_components[].size")?;
        f.aid("custom_components[].AID_length", "custom_components[].AID")?;
    }
    f.finish("custom_components")
}

fn push_ber_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let significant = &bytes[skip..];
    out.push(0x80 | significant.len() as u8);
    out.extend_from_slice(significant);
}

/// Builds structurally valid CAP 2.2 files: the project's demo firmware and
/// test fixtures. The result parses with [`CapFile::from_bytes`] and has the
/// real layout of every component the parser looks into; the bytecode is
/// deterministic filler, not a working applet.
///
/// ```
/// use card::cap::{CapBuilder, CapFile};
///
/// let zip = CapBuilder::new(&[0xA0, 0, 0, 0x08, 0x77, 0x01], "tapline/wallet")
///     .package_version(1, 0)
///     .applet(&[0xA0, 0, 0, 0x08, 0x77, 0x01, 0x01])
///     .code_size(12 * 1024)
///     .build()?;
/// let cap = CapFile::from_bytes(&zip)?;
/// assert_eq!(cap.package_name(), Some("tapline/wallet"));
/// assert_eq!(cap.load_file_len(false), 12 * 1024);
/// # Ok::<(), card::cap::CapError>(())
/// ```
///
/// The archive holds `META-INF/MANIFEST.MF` and
/// `<package name>/javacard/{Header,Directory,Import,Applet,Class,Method,
/// StaticField,ConstantPool,RefLocation,Descriptor}.cap` (Applet only when
/// there are applets). Entries are stored uncompressed with a fixed
/// timestamp (1980-01-01) and mode, so equal inputs give byte-identical
/// archives regardless of the compressor's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapBuilder {
    package_aid: Vec<u8>,
    package_version: (u8, u8),
    package_name: String,
    applets: Vec<Vec<u8>>,
    code_size: usize,
}

impl CapBuilder {
    /// A builder for package `package_aid` (5..=16 bytes) named
    /// `package_name` (`"tapline/wallet"`; `"tapline.wallet"` is accepted and
    /// stored as `"tapline/wallet"`); version 1.0, no applets, minimal size.
    pub fn new(package_aid: &[u8], package_name: &str) -> CapBuilder {
        CapBuilder {
            package_aid: package_aid.to_vec(),
            package_version: (1, 0),
            package_name: package_name.replace('.', "/"),
            applets: Vec::new(),
            code_size: 0,
        }
    }

    /// Sets the package version (default 1.0).
    pub fn package_version(mut self, major: u8, minor: u8) -> CapBuilder {
        self.package_version = (major, minor);
        self
    }

    /// Adds an applet (AID of 5..=16 bytes); it gets its own class and
    /// `install` method.
    pub fn applet(mut self, aid: &[u8]) -> CapBuilder {
        self.applets.push(aid.to_vec());
        self
    }

    /// Sets the target size in bytes of the load file *without* Descriptor
    /// ([`CapFile::load_file_len`]`(false)`). Filler bytecode in the Method
    /// component makes it exact; a target below the minimal file
    /// ([`CapBuilder::min_code_size`]) gives the minimal file.
    pub fn code_size(mut self, bytes: usize) -> CapBuilder {
        self.code_size = bytes;
        self
    }

    /// The smallest load file (without Descriptor) these inputs can give.
    pub fn min_code_size(&self) -> Result<usize, CapError> {
        self.validate()?;
        Ok(self
            .components(0)?
            .iter()
            .filter(|(kind, _)| *kind != ComponentKind::Descriptor)
            .map(|(_, c)| c.len())
            .sum())
    }

    /// The largest load file (without Descriptor): the Method component is
    /// limited to 65535 bytes of info.
    pub fn max_code_size(&self) -> Result<usize, CapError> {
        let min = self.min_code_size()?;
        Ok(min + (usize::from(u16::MAX) - self.method_info_len(0)))
    }

    /// Builds the CAP file (a ZIP archive).
    pub fn build(&self) -> Result<Vec<u8>, CapError> {
        let min = self.min_code_size()?;
        let padding = self.code_size.saturating_sub(min);
        let max_padding = usize::from(u16::MAX) - self.method_info_len(0);
        if padding > max_padding {
            return Err(CapError::InvalidInput {
                field: "code_size",
                reason: format!(
                    "{} bytes needs a Method component over 65535 bytes; at most {} fit",
                    self.code_size,
                    min + max_padding
                ),
            });
        }
        let components = self.components(padding)?;

        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .last_modified_time(DateTime::default())
            .unix_permissions(0o644);
        zip.start_file("META-INF/MANIFEST.MF", options).map_err(CapError::ZipWrite)?;
        zip.write_all(self.manifest().as_bytes()).map_err(|e| CapError::ZipWrite(ZipError::Io(e)))?;
        for (kind, data) in &components {
            let name = format!("{}/javacard/{}", self.package_name, kind.file_name());
            zip.start_file(name, options).map_err(CapError::ZipWrite)?;
            zip.write_all(data).map_err(|e| CapError::ZipWrite(ZipError::Io(e)))?;
        }
        Ok(zip.finish().map_err(CapError::ZipWrite)?.into_inner())
    }

    fn validate(&self) -> Result<(), CapError> {
        let aid_ok = |aid: &[u8]| (5..=16).contains(&aid.len());
        if !aid_ok(&self.package_aid) {
            return Err(CapError::InvalidInput {
                field: "package_aid",
                reason: format!("{} bytes, must be 5..=16", self.package_aid.len()),
            });
        }
        if let Some(aid) = self.applets.iter().find(|aid| !aid_ok(aid)) {
            return Err(CapError::InvalidInput {
                field: "applet",
                reason: format!("AID {} is {} bytes, must be 5..=16", hex::encode_upper(aid), aid.len()),
            });
        }
        if self.applets.len() > usize::from(u8::MAX) {
            return Err(CapError::InvalidInput {
                field: "applet",
                reason: format!("{} applets, at most 255 fit the u1 count", self.applets.len()),
            });
        }
        let name = &self.package_name;
        let segment_ok = |s: &str| {
            s.chars().next().is_some_and(|c| !c.is_ascii_digit())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        };
        if name.is_empty() || name.len() > 255 || !name.split('/').all(segment_ok) {
            return Err(CapError::InvalidInput {
                field: "package_name",
                reason: format!(
                    "{name:?} is not a package name like \"tapline/wallet\" (ASCII identifiers joined by '/', at most 255 bytes)"
                ),
            });
        }
        Ok(())
    }

    fn class_count(&self) -> usize {
        self.applets.len().max(1)
    }

    /// Method info: handler_count, one 3-byte install method per applet,
    /// then the filler method (2-byte header, padding, return).
    fn method_info_len(&self, padding: usize) -> usize {
        1 + 3 * self.applets.len() + 3 + padding
    }

    /// All components, in the order they are written to the archive.
    fn components(&self, padding: usize) -> Result<Vec<(ComponentKind, Vec<u8>)>, CapError> {
        let applet_count = self.applets.len();
        let class_count = self.class_count();

        let import = component(ComponentKind::Import, |out| {
            out.push(1); // count
            out.extend_from_slice(&[0, 1]); // minor, major: java/lang 1.0
            out.push(JAVA_LANG_AID.len() as u8);
            out.extend_from_slice(&JAVA_LANG_AID);
        })?;

        // One entry: CONSTANT_Classref to java/lang/Object (external: package
        // token 0 with the high bit set, class token 0).
        let constant_pool = component(ComponentKind::ConstantPool, |out| {
            out.extend_from_slice(&1u16.to_be_bytes());
            out.extend_from_slice(&[0x01, 0x80, 0x00, 0x00]);
        })?;

        // signature_pool_length, then per class a class_info extending
        // java/lang/Object with no fields and no virtual methods of its own.
        const CLASS_INFO_LEN: usize = 10;
        let class = component(ComponentKind::Class, |out| {
            out.extend_from_slice(&0u16.to_be_bytes());
            for _ in 0..class_count {
                out.push(0x00); // flags | interface_count
                out.extend_from_slice(&[0x80, 0x00]); // super_class_ref: java/lang/Object
                out.push(0); // declared_instance_size
                out.push(0xFF); // first_reference_token
                out.push(0); // reference_count
                out.push(1); // public_method_table_base
                out.push(0); // public_method_table_count
                out.push(0); // package_method_table_base
                out.push(0); // package_method_table_count
            }
        })?;
        let class_ref = |i: usize| (2 + i * CLASS_INFO_LEN) as u16;

        // Method info: handler_count 0; per applet `static void
        // install(byte[], short, byte) { return; }`; then a private static
        // filler method: sconst_n/pop pairs (and a nop if odd) and return.
        let install_offset = |i: usize| (1 + 3 * i) as u16;
        let filler_offset = 1 + 3 * applet_count;
        let method = component(ComponentKind::Method, |out| {
            out.push(0); // handler_count
            for _ in 0..applet_count {
                out.extend_from_slice(&[0x00, 0x30, 0x7A]); // max_stack 0, nargs 3; return
            }
            out.extend_from_slice(&[0x01, 0x00]); // max_stack 1, nargs 0
            out.extend((0..padding / 2).flat_map(|k| [0x03 + (k % 6) as u8, 0x3B]));
            if padding % 2 == 1 {
                out.push(0x00); // nop
            }
            out.push(0x7A); // return
        })?;

        // image_size, reference_count, array_init_count, default_value_count,
        // non_default_value_count: no static fields.
        let static_field = component(ComponentKind::StaticField, |out| {
            out.extend_from_slice(&[0; 10]);
        })?;

        // No constant-pool references in the bytecode.
        let ref_location = component(ComponentKind::RefLocation, |out| {
            out.extend_from_slice(&[0, 0, 0, 0]);
        })?;

        let applet = if self.applets.is_empty() {
            None
        } else {
            Some(component(ComponentKind::Applet, |out| {
                out.push(applet_count as u8);
                for (i, aid) in self.applets.iter().enumerate() {
                    out.push(aid.len() as u8);
                    out.extend_from_slice(aid);
                    out.extend_from_slice(&install_offset(i).to_be_bytes());
                }
            })?)
        };

        let header = component(ComponentKind::Header, |out| {
            out.extend_from_slice(&CAP_MAGIC.to_be_bytes());
            out.extend_from_slice(&[2, 2]); // CAP format minor, major: 2.2
            out.push(if applet_count > 0 { ACC_APPLET } else { 0 });
            out.push(self.package_version.1);
            out.push(self.package_version.0);
            out.push(self.package_aid.len() as u8);
            out.extend_from_slice(&self.package_aid);
            out.push(self.package_name.len() as u8);
            out.extend_from_slice(self.package_name.as_bytes());
        })?;

        // Class descriptors (install method in each applet's class, filler in
        // the first class), then the type descriptors: one constant pool
        // type (a class ref), `(byte[], short, byte)void` at 4, `()void` at 7.
        const INSTALL_TYPE: u16 = 4;
        const FILLER_TYPE: u16 = 7;
        let filler_bytecode = (padding + 1) as u16;
        let descriptor = component(ComponentKind::Descriptor, |out| {
            out.push(class_count as u8);
            for i in 0..class_count {
                let has_install = i < applet_count;
                let has_filler = i == 0;
                out.push(i as u8); // token
                out.push(0x01); // ACC_PUBLIC
                out.extend_from_slice(&class_ref(i).to_be_bytes());
                out.push(0); // interface_count
                out.extend_from_slice(&0u16.to_be_bytes()); // field_count
                let methods = u16::from(has_install) + u16::from(has_filler);
                out.extend_from_slice(&methods.to_be_bytes());
                let mut method = |access: u8, offset: u16, type_offset: u16, bytecode: u16| {
                    out.push(0xFF); // token: static methods have none
                    out.push(access);
                    out.extend_from_slice(&offset.to_be_bytes());
                    out.extend_from_slice(&type_offset.to_be_bytes());
                    out.extend_from_slice(&bytecode.to_be_bytes());
                    out.extend_from_slice(&0u16.to_be_bytes()); // exception_handler_count
                    out.extend_from_slice(&0u16.to_be_bytes()); // exception_handler_index
                };
                if has_install {
                    method(0x09, install_offset(i) + 2, INSTALL_TYPE, 1); // public static
                }
                if has_filler {
                    method(0x0A, filler_offset as u16 + 2, FILLER_TYPE, filler_bytecode); // private static
                }
            }
            out.extend_from_slice(&1u16.to_be_bytes()); // constant_pool_count
            out.extend_from_slice(&0xFFFFu16.to_be_bytes()); // class ref: no type
            out.extend_from_slice(&[0x04, 0xB4, 0x31]); // ([B S B)V
            out.extend_from_slice(&[0x01, 0x10]); // ()V
        })?;

        let info_len = |c: &Vec<u8>| (c.len() - 3) as u16;
        let directory_len = 3 + 2 * 12 + 6 + 3;
        let directory = component(ComponentKind::Directory, |out| {
            let sizes: [u16; 12] = [
                info_len(&header),
                (directory_len - 3) as u16,
                applet.as_ref().map_or(0, info_len),
                info_len(&import),
                info_len(&constant_pool),
                info_len(&class),
                info_len(&method),
                info_len(&static_field),
                info_len(&ref_location),
                0, // Export
                info_len(&descriptor),
                0, // Debug
            ];
            for size in sizes {
                out.extend_from_slice(&size.to_be_bytes());
            }
            out.extend_from_slice(&[0; 6]); // static_field_size_info
            out.push(1); // import_count
            out.push(applet_count as u8);
            out.push(0); // custom_count
        })?;
        debug_assert_eq!(directory.len(), directory_len);

        let mut out = vec![
            (ComponentKind::Header, header),
            (ComponentKind::Directory, directory),
            (ComponentKind::Import, import),
        ];
        if let Some(applet) = applet {
            out.push((ComponentKind::Applet, applet));
        }
        out.extend([
            (ComponentKind::Class, class),
            (ComponentKind::Method, method),
            (ComponentKind::StaticField, static_field),
            (ComponentKind::ConstantPool, constant_pool),
            (ComponentKind::RefLocation, ref_location),
            (ComponentKind::Descriptor, descriptor),
        ]);
        Ok(out)
    }

    /// `META-INF/MANIFEST.MF` in the style of Oracle's converter (CRLF line
    /// ends, lines folded at 72 bytes), without a creation time.
    fn manifest(&self) -> String {
        let aid = |aid: &[u8]| aid.iter().map(|b| format!("0x{b:02x}")).collect::<Vec<_>>().join(":");
        let mut lines = vec![
            "Manifest-Version: 1.0".to_owned(),
            "Created-By: Tapline CapBuilder".to_owned(),
            String::new(),
            format!("Name: {}", self.package_name),
            "Java-Card-CAP-File-Version: 2.2".to_owned(),
            format!("Java-Card-Package-Version: {}.{}", self.package_version.0, self.package_version.1),
            format!("Java-Card-Package-Name: {}", self.package_name.replace('/', ".")),
            format!("Java-Card-Package-AID: {}", aid(&self.package_aid)),
        ];
        for (i, applet) in self.applets.iter().enumerate() {
            lines.push(format!("Java-Card-Applet-{}-AID: {}", i + 1, aid(applet)));
        }
        lines.push(format!("Java-Card-Imported-Package-1-AID: {}", aid(&JAVA_LANG_AID)));
        lines.push("Java-Card-Imported-Package-1-Version: 1.0".to_owned());
        lines.push("Java-Card-Integer-Support-Required: FALSE".to_owned());
        let mut out = String::new();
        for line in lines {
            // Fold: 72 bytes on the first line, continuation lines start with a space.
            let mut rest = line.as_str();
            let mut width = 72;
            loop {
                let cut = rest.len().min(width);
                out.push_str(&rest[..cut]);
                out.push_str("\r\n");
                rest = &rest[cut..];
                if rest.is_empty() {
                    break;
                }
                out.push(' ');
                width = 71;
            }
        }
        out.push_str("\r\n");
        out
    }
}

/// A component: tag, u2 size, then the info written by `info`.
fn component(kind: ComponentKind, info: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<u8>, CapError> {
    let mut out = vec![kind.tag(), 0, 0];
    info(&mut out);
    let size = u16::try_from(out.len() - 3).map_err(|_| CapError::InvalidInput {
        field: kind.name(),
        reason: format!("{} bytes of info, more than a u2 size allows", out.len() - 3),
    })?;
    out[1..3].copy_from_slice(&size.to_be_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_CAP: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/cap/Empty_0102030405_8d5ac9e2_2.2.1.cap");
    const KEYCARD_MATH_CAP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/cap/keycard-math.cap");

    fn empty() -> CapFile {
        CapFile::from_path(EMPTY_CAP).expect("Empty CAP parses")
    }

    fn keycard_math() -> CapFile {
        CapFile::from_path(KEYCARD_MATH_CAP).expect("keycard-math CAP parses")
    }

    fn hex_list(aids: &[&[u8]]) -> String {
        aids.iter().map(hex::encode_upper).collect::<Vec<_>>().join(", ")
    }

    /// A ZIP with the given entries, stored.
    fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        for (name, data) in entries {
            zip.start_file(name.as_str(), options).expect("start entry");
            zip.write_all(data).expect("write entry");
        }
        zip.finish().expect("finish zip").into_inner()
    }

    /// The components of a parsed CAP as `(entry name, bytes)`, re-zippable.
    fn entries_of(cap: &CapFile) -> Vec<(String, Vec<u8>)> {
        cap.components()
            .map(|(kind, data)| (format!("{}/javacard/{}", cap.package_path(), kind.file_name()), data.to_vec()))
            .collect()
    }

    fn with_component(cap: &CapFile, kind: ComponentKind, data: Option<Vec<u8>>) -> Vec<u8> {
        let mut entries: Vec<_> = entries_of(cap)
            .into_iter()
            .filter(|(name, _)| !name.ends_with(&format!("/{}", kind.file_name())))
            .collect();
        if let Some(data) = data {
            entries.push((format!("{}/javacard/{}", cap.package_path(), kind.file_name()), data));
        }
        zip_of(&entries)
    }

    #[test]
    fn component_kind_names_and_tags() {
        for kind in ComponentKind::ALL {
            assert_eq!(ComponentKind::from_tag(kind.tag()), Some(kind));
            assert_eq!(ComponentKind::from_file_name(kind.file_name()), Some(kind));
            assert_eq!(kind.file_name(), format!("{kind}.cap"));
        }
        assert_eq!(ComponentKind::Header.tag(), 1);
        assert_eq!(ComponentKind::Debug.tag(), 12);
        assert_eq!(ComponentKind::from_tag(0), None);
        assert_eq!(ComponentKind::from_tag(13), None);
        assert_eq!(ComponentKind::from_file_name("header.cap"), None);
        assert_eq!(ComponentKind::from_file_name("Header.exp"), None);
        assert!(!ComponentKind::Descriptor.is_mandatory());
        assert!(ComponentKind::RefLocation.is_mandatory());
    }

    #[test]
    fn empty_applet_parses() {
        let cap = empty();
        assert_eq!(cap.package_aid(), [1, 2, 3, 4, 5]);
        assert_eq!(cap.package_version(), (0, 0));
        // The file name says 2.2.1 (the SDK), the Header says CAP format 2.1:
        // no package_name_info.
        assert_eq!(cap.format_version(), (2, 1));
        assert_eq!(cap.package_name(), None);
        assert_eq!(cap.package_path(), "testapplets/empty");
        assert_eq!(cap.flags(), ACC_APPLET);
        assert_eq!(cap.applets(), [AppletInfo { aid: vec![1, 2, 3, 4, 5, 6, 7, 8], install_method_offset: 0x13 }]);
        assert_eq!(cap.imports().len(), 3);
        assert!(cap.imports().iter().any(|i| i.aid == JAVA_LANG_AID && i.version == (1, 0)));
        assert!(cap.component(ComponentKind::Export).is_none());
        assert!(cap.component(ComponentKind::Debug).is_none());
        assert!(cap.has_descriptor());
    }

    #[test]
    fn empty_applet_hash_is_over_the_raw_load_file() {
        let cap = empty();
        let raw = cap.load_file(false);
        assert_eq!(raw.len(), 211);
        assert_eq!(cap.load_file_len(false), raw.len());
        // Order: Header, Directory, Import, Applet, Class, ...
        assert_eq!(raw[0], ComponentKind::Header.tag());
        let header_len = cap.component(ComponentKind::Header).expect("header").len();
        assert_eq!(raw[header_len], ComponentKind::Directory.tag());

        let hash = cap.load_file_sha256(false);
        assert_eq!(hex::encode(&hash[..4]), "8d5ac9e2", "full: {}", hex::encode(hash));
        assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(&raw)));

        // The C4-wrapped block is *not* what the 8d5ac9e2 in the file name hashes.
        let block = cap.load_file_data_block(false);
        assert_eq!(block[..3], [0xC4, 0x81, 211]);
        assert_eq!(block[3..], raw[..]);
        let block_hash = Sha256::digest(&block);
        assert_ne!(hex::encode(&block_hash[..4]), "8d5ac9e2");
    }

    #[test]
    fn keycard_math_parses() {
        let cap = keycard_math();
        let applets = cap.applet_aids();
        let summary = format!(
            "package {} v{:?} ({:?}), applets [{}]",
            hex::encode_upper(cap.package_aid()),
            cap.package_version(),
            cap.package_name(),
            hex_list(&applets)
        );
        assert_eq!(hex::encode_upper(cap.package_aid()), "A0000008040002", "{summary}");
        assert_eq!(cap.package_version(), (1, 0), "{summary}");
        assert_eq!(cap.package_name(), Some("im/status/keycard/math"), "{summary}");
        assert_eq!(cap.format_version(), (2, 2), "{summary}");
        // A library package: no Applet component, an Export component.
        assert!(applets.is_empty(), "{summary}");
        assert_eq!(cap.flags(), ACC_EXPORT, "{summary}");
        assert!(cap.component(ComponentKind::Export).is_some(), "{summary}");
        assert!(cap.component(ComponentKind::Debug).is_some(), "{summary}");
        assert_eq!(cap.imports().len(), 4, "{summary}");
    }

    #[test]
    fn descriptor_adds_exactly_its_size() {
        for cap in [empty(), keycard_math()] {
            let descriptor = cap.component(ComponentKind::Descriptor).expect("descriptor");
            let declared = usize::from(u16::from_be_bytes([descriptor[1], descriptor[2]]));
            let without = cap.load_file(false);
            let with = cap.load_file(true);
            assert_eq!(with.len(), without.len() + descriptor.len(), "{}", cap.package_path());
            assert_eq!(descriptor.len(), 3 + declared);
            assert!(with.starts_with(&without));
            assert!(with.ends_with(descriptor));
            assert_eq!(cap.load_file_len(true), with.len());
        }
    }

    #[test]
    fn keycard_math_load_file_order_and_debug_excluded() {
        let cap = keycard_math();
        let load = cap.load_file(true);
        let mut pos = 0;
        let mut seen = Vec::new();
        while pos < load.len() {
            let kind = ComponentKind::from_tag(load[pos]).expect("known tag");
            let size = usize::from(u16::from_be_bytes([load[pos + 1], load[pos + 2]]));
            seen.push(kind);
            pos += 3 + size;
        }
        assert_eq!(pos, load.len());
        use ComponentKind::*;
        assert_eq!(
            seen,
            [Header, Directory, Import, Class, Method, StaticField, Export, ConstantPool, RefLocation, Descriptor]
        );
        let block = cap.load_file_data_block(true);
        let len = load.len();
        assert!(len > 255);
        assert_eq!(block[..4], [0xC4, 0x82, (len >> 8) as u8, len as u8]);
    }

    #[test]
    fn ber_lengths() {
        let enc = |len| {
            let mut v = Vec::new();
            push_ber_length(&mut v, len);
            v
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(0x7F), [0x7F]);
        assert_eq!(enc(0x80), [0x81, 0x80]);
        assert_eq!(enc(0xFF), [0x81, 0xFF]);
        assert_eq!(enc(0x100), [0x82, 0x01, 0x00]);
        assert_eq!(enc(0xFFFF), [0x82, 0xFF, 0xFF]);
        assert_eq!(enc(0x10000), [0x83, 0x01, 0x00, 0x00]);
    }

    #[test]
    fn ignores_non_component_entries() {
        let cap = empty();
        let mut entries = entries_of(&cap);
        entries.push(("META-INF/MANIFEST.MF".into(), b"Manifest-Version: 1.0\r\n".to_vec()));
        entries.push(("testapplets/empty/javacard/empty.exp".into(), vec![0xFF; 10]));
        entries.push(("testapplets/empty/javacard/Custom.cap".into(), vec![0x80, 0, 0]));
        entries.push(("testapplets/empty/Header.cap".into(), vec![0xFF; 4]));
        entries.push(("testapplets/empty/javacard/".into(), Vec::new()));
        let reparsed = CapFile::from_bytes(&zip_of(&entries)).expect("parses");
        assert_eq!(reparsed, cap);
    }

    #[test]
    fn top_level_javacard_dir_is_accepted() {
        let cap = empty();
        let entries: Vec<_> =
            cap.components().map(|(kind, data)| (format!("javacard/{}", kind.file_name()), data.to_vec())).collect();
        let reparsed = CapFile::from_bytes(&zip_of(&entries)).expect("parses");
        assert_eq!(reparsed.package_path(), "");
        assert_eq!(reparsed.load_file(true), cap.load_file(true));
    }

    #[test]
    fn wrong_tag_is_named() {
        let cap = empty();
        let mut header = cap.component(ComponentKind::Header).expect("header").to_vec();
        header[0] = 0x02;
        let err =
            CapFile::from_bytes(&with_component(&cap, ComponentKind::Header, Some(header))).expect_err("wrong tag");
        assert!(matches!(err, CapError::WrongTag { kind: ComponentKind::Header, expected: 1, found: 2 }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("Header.cap") && msg.contains("0x02") && msg.contains("0x01"), "{msg}");
    }

    #[test]
    fn size_mismatch_is_named() {
        let cap = empty();
        let mut method = cap.component(ComponentKind::Method).expect("method").to_vec();
        method.push(0x00);
        let err =
            CapFile::from_bytes(&with_component(&cap, ComponentKind::Method, Some(method))).expect_err("size mismatch");
        assert!(
            matches!(err, CapError::SizeMismatch { kind: ComponentKind::Method, declared: 42, actual: 43 }),
            "{err}"
        );
    }

    #[test]
    fn bad_magic_is_named() {
        let cap = empty();
        let mut header = cap.component(ComponentKind::Header).expect("header").to_vec();
        header[3] = 0xCA;
        let err =
            CapFile::from_bytes(&with_component(&cap, ComponentKind::Header, Some(header))).expect_err("bad magic");
        let msg = err.to_string();
        assert!(msg.contains("magic") && msg.contains("DECAFFED") && msg.contains("CACAFFED"), "{msg}");
    }

    #[test]
    fn bad_aid_length_is_named() {
        let cap = empty();
        // Header with a 4-byte package AID.
        let header = [1, 0, 14, 0xDE, 0xCA, 0xFF, 0xED, 1, 2, 4, 0, 0, 4, 1, 2, 3, 4];
        let err = CapFile::from_bytes(&with_component(&cap, ComponentKind::Header, Some(header.to_vec())))
            .expect_err("short AID");
        let msg = err.to_string();
        assert!(msg.contains("Header") && msg.contains("AID_length") && msg.contains("found 4"), "{msg}");

        // Applet with a 17-byte AID.
        let mut applet = vec![3, 0, 21, 1, 17];
        applet.extend_from_slice(&[0xAA; 17]);
        applet.extend_from_slice(&[0, 0x13]);
        let err = CapFile::from_bytes(&with_component(&cap, ComponentKind::Applet, Some(applet)))
            .expect_err("long applet AID");
        let msg = err.to_string();
        assert!(msg.contains("Applet") && msg.contains("AID_length") && msg.contains("17"), "{msg}");
    }

    #[test]
    fn applet_component_checks() {
        let cap = empty();
        // Install offset past the Method component.
        let applet = vec![3, 0, 12, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0x00];
        let err = CapFile::from_bytes(&with_component(&cap, ComponentKind::Applet, Some(applet))).expect_err("offset");
        assert!(err.to_string().contains("install_method_offset"), "{err}");
        // Count says 2, only one applet.
        let applet = vec![3, 0, 12, 2, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0x00, 0x13];
        let err =
            CapFile::from_bytes(&with_component(&cap, ComponentKind::Applet, Some(applet))).expect_err("truncated");
        assert!(matches!(err, CapError::Truncated { kind: ComponentKind::Applet, .. }), "{err}");
        // Applet removed: the Header still says ACC_APPLET.
        let err = CapFile::from_bytes(&with_component(&cap, ComponentKind::Applet, None)).expect_err("flag");
        assert!(err.to_string().contains("ACC_APPLET"), "{err}");
    }

    #[test]
    fn missing_components_are_named() {
        let cap = empty();
        for kind in ComponentKind::MANDATORY {
            let err = CapFile::from_bytes(&with_component(&cap, kind, None)).expect_err("missing");
            assert!(matches!(err, CapError::MissingComponent { kind: k } if k == kind), "{kind}: {err}");
            assert!(err.to_string().contains(kind.file_name()), "{err}");
        }
        // Descriptor is optional for loading, even though the Directory lists it.
        let stripped = CapFile::from_bytes(&with_component(&cap, ComponentKind::Descriptor, None))
            .expect("loads without Descriptor");
        assert!(!stripped.has_descriptor());
        assert_eq!(stripped.load_file(true), cap.load_file(false));
    }

    #[test]
    fn directory_mismatch_is_named() {
        let cap = empty();
        let mut directory = cap.component(ComponentKind::Directory).expect("directory").to_vec();
        // component_sizes[Method] (index 6) said 42.
        let at = 3 + 2 * 6;
        directory[at..at + 2].copy_from_slice(&41u16.to_be_bytes());
        let err = CapFile::from_bytes(&with_component(&cap, ComponentKind::Directory, Some(directory)))
            .expect_err("mismatch");
        assert!(matches!(err, CapError::DirectoryMismatch { kind: ComponentKind::Method, directory: 41, .. }), "{err}");
    }

    #[test]
    fn duplicates_and_mixed_packages() {
        let cap = empty();
        let mut entries = entries_of(&cap);
        entries.push((
            "other/pkg/javacard/Header.cap".into(),
            cap.component(ComponentKind::Header).expect("header").to_vec(),
        ));
        let err = CapFile::from_bytes(&zip_of(&entries)).expect_err("mixed");
        assert!(matches!(err, CapError::MixedPackages { .. }), "{err}");

        let err = CapFile::from_bytes(&zip_of(&[])).expect_err("empty zip");
        assert!(matches!(err, CapError::MissingComponent { kind: ComponentKind::Header }), "{err}");
    }

    #[test]
    fn oversize_component_is_rejected() {
        let cap = empty();
        let err =
            CapFile::from_bytes(&with_component(&cap, ComponentKind::Method, Some(vec![7; MAX_COMPONENT_LEN + 1])))
                .expect_err("too big");
        assert!(matches!(err, CapError::ComponentTooLarge { kind: ComponentKind::Method, .. }), "{err}");
    }

    /// xorshift64*: deterministic noise for the hostile-input tests.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn hostile_input_never_panics() {
        let mut noise = Noise(0x7A91_1AE5_EED5_0001);
        for path in [EMPTY_CAP, KEYCARD_MATH_CAP] {
            let bytes = std::fs::read(path).expect("read test CAP");
            // Every truncation of the archive.
            for len in 0..bytes.len() {
                let _ = CapFile::from_bytes(&bytes[..len]);
            }
            // Random byte flips in the archive.
            for _ in 0..300 {
                let mut copy = bytes.clone();
                for _ in 0..1 + noise.below(4) {
                    let at = noise.below(copy.len());
                    copy[at] = noise.next() as u8;
                }
                let _ = CapFile::from_bytes(&copy);
            }
        }
        // Random bytes, with and without a ZIP signature in front.
        for _ in 0..300 {
            let len = noise.below(600);
            let mut junk: Vec<u8> = (0..len).map(|_| noise.next() as u8).collect();
            if noise.below(2) == 0 && junk.len() >= 4 {
                junk[..4].copy_from_slice(b"PK\x03\x04");
            }
            assert!(CapFile::from_bytes(&junk).is_err());
        }
        // Components mangled inside a valid ZIP: truncated, extended, flipped.
        for cap in [empty(), keycard_math()] {
            for kind in ComponentKind::ALL {
                let Some(original) = cap.component(kind) else {
                    continue;
                };
                for cut in 0..original.len().min(64) {
                    let _ = CapFile::from_bytes(&with_component(&cap, kind, Some(original[..cut].to_vec())));
                }
                for _ in 0..40 {
                    let mut data = original.to_vec();
                    for _ in 0..1 + noise.below(3) {
                        let at = noise.below(data.len());
                        data[at] = noise.next() as u8;
                    }
                    let _ = CapFile::from_bytes(&with_component(&cap, kind, Some(data)));
                }
                let mut data = original.to_vec();
                data.extend_from_slice(&[0xAB; 5]);
                assert!(CapFile::from_bytes(&with_component(&cap, kind, Some(data))).is_err(), "{kind}");
            }
        }
    }

    #[test]
    fn load_file_round_trip() {
        for cap in [empty(), keycard_math()] {
            for with_descriptor in [false, true] {
                let load = cap.load_file(with_descriptor);
                let parsed = CapFile::from_load_file(&load).expect("load file parses");
                assert_eq!(parsed.header(), cap.header());
                assert_eq!(parsed.applets(), cap.applets());
                assert_eq!(parsed.imports(), cap.imports());
                assert_eq!(parsed.package_path(), "");
                assert_eq!(parsed.has_descriptor(), with_descriptor);
                assert_eq!(parsed.load_file(true), load);
                assert_eq!(parsed.load_file_sha256(with_descriptor), cap.load_file_sha256(with_descriptor));
            }
        }
    }

    #[test]
    fn components_of_load_file_for_the_emulator() {
        let cap = empty();
        let load = cap.load_file(false);
        let parts = components_of_load_file(&load).expect("splits");
        let header = parts.header().expect("header");
        assert_eq!(header.package_aid, [1, 2, 3, 4, 5]);
        assert_eq!(header.package_version, (0, 0));
        assert_eq!(parts.applet_aids().expect("applets"), [vec![1, 2, 3, 4, 5, 6, 7, 8]]);
        use ComponentKind::*;
        assert_eq!(
            parts.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            [Header, Directory, Import, Applet, Class, Method, StaticField, ConstantPool, RefLocation]
        );
        assert_eq!(parts.component(ComponentKind::Method), cap.component(ComponentKind::Method));

        let math = keycard_math();
        let load = math.load_file(true);
        let parts = components_of_load_file(&load).expect("splits");
        assert_eq!(parts.header().expect("header").package_name.as_deref(), Some("im/status/keycard/math"));
        assert!(parts.applet_aids().expect("no applets").is_empty());
    }

    #[test]
    fn bad_load_files_are_named() {
        let cap = empty();
        let get = |kind| cap.component(kind).expect("component").to_vec();
        use ComponentKind::*;
        let concat = |kinds: &[ComponentKind]| kinds.iter().flat_map(|k| get(*k)).collect::<Vec<u8>>();
        let all = [Header, Directory, Import, Applet, Class, Method, StaticField, ConstantPool, RefLocation];

        // Out of order: Import before Directory.
        let swapped =
            concat(&[Header, Import, Directory, Applet, Class, Method, StaticField, ConstantPool, RefLocation]);
        let err = components_of_load_file(&swapped).expect_err("order");
        assert!(err.to_string().contains("Directory component after Import"), "{err}");
        // Repeated component.
        let mut repeated = concat(&all);
        repeated.extend(get(RefLocation));
        let err = components_of_load_file(&repeated).expect_err("repeat");
        assert!(err.to_string().contains("RefLocation component after RefLocation"), "{err}");
        // Debug and unknown tags, stray byte.
        let mut with_debug = concat(&all);
        with_debug.extend([12, 0, 1, 0]);
        let err = components_of_load_file(&with_debug).expect_err("debug");
        assert!(err.to_string().contains("Debug component"), "{err}");
        let mut stray = concat(&all);
        let at = stray.len();
        stray.push(0x00);
        let err = components_of_load_file(&stray).expect_err("stray");
        assert!(matches!(&err, CapError::LoadFile { offset, .. } if *offset == at), "{err}");
        assert!(err.to_string().contains("unknown component tag 0x00"), "{err}");
        // Truncated in the last component.
        let full = concat(&all);
        let err = components_of_load_file(&full[..full.len() - 1]).expect_err("truncated");
        assert!(err.to_string().contains("RefLocation component: size says 9"), "{err}");
        // Missing mandatory component.
        let err = components_of_load_file(&concat(&[
            Header,
            Directory,
            Import,
            Applet,
            Class,
            Method,
            StaticField,
            RefLocation,
        ]))
        .expect_err("missing");
        assert!(matches!(err, CapError::MissingComponent { kind: ConstantPool }), "{err}");
        // Splits fine but the Header is bad: reported by header().
        let mut bad_header = full.clone();
        bad_header[3] = 0;
        let parts = components_of_load_file(&bad_header).expect("splits");
        assert!(parts.header().expect_err("magic").to_string().contains("magic"));
        assert!(CapFile::from_load_file(&bad_header).is_err());

        // Hostile input: every truncation and random flips, no panic.
        let mut noise = Noise(0xC4C4_0001);
        for len in 0..full.len() {
            if let Ok(parts) = components_of_load_file(&full[..len]) {
                let _ = (parts.header(), parts.applet_aids());
            }
            let _ = CapFile::from_load_file(&full[..len]);
        }
        for _ in 0..2000 {
            let mut data = full.clone();
            for _ in 0..1 + noise.below(4) {
                let at = noise.below(data.len());
                data[at] = noise.next() as u8;
            }
            if let Ok(parts) = components_of_load_file(&data) {
                let _ = (parts.header(), parts.applet_aids());
            }
            let _ = CapFile::from_load_file(&data);
        }
    }

    fn wallet_builder() -> CapBuilder {
        CapBuilder::new(&[0xA0, 0x00, 0x00, 0x08, 0x77, 0x01], "tapline/wallet")
            .package_version(1, 3)
            .applet(&[0xA0, 0x00, 0x00, 0x08, 0x77, 0x01, 0x01])
            .applet(&[0xA0, 0x00, 0x00, 0x08, 0x77, 0x01, 0x02, 0x00])
            .code_size(12_345)
    }

    #[test]
    fn builder_round_trip() {
        let builder = wallet_builder();
        let zip = builder.build().expect("builds");
        let cap = CapFile::from_bytes(&zip).expect("parses");
        assert_eq!(cap.package_aid(), [0xA0, 0x00, 0x00, 0x08, 0x77, 0x01]);
        assert_eq!(cap.package_version(), (1, 3));
        assert_eq!(cap.package_name(), Some("tapline/wallet"));
        assert_eq!(cap.package_path(), "tapline/wallet");
        assert_eq!(cap.format_version(), (2, 2));
        assert_eq!(cap.flags(), ACC_APPLET);
        assert_eq!(hex_list(&cap.applet_aids()), "A0000008770101, A000000877010200");
        assert_eq!(cap.applets()[0].install_method_offset, 1);
        assert_eq!(cap.applets()[1].install_method_offset, 4);
        assert_eq!(cap.imports(), [ImportedPackage { aid: JAVA_LANG_AID.to_vec(), version: (1, 0) }]);
        assert!(cap.has_descriptor());
        assert!(cap.component(ComponentKind::Export).is_none());
        // Exactly the requested size, without Descriptor.
        assert_eq!(cap.load_file_len(false), 12_345);
        let descriptor = cap.component(ComponentKind::Descriptor).expect("descriptor");
        assert_eq!(cap.load_file_len(true), 12_345 + descriptor.len());

        // The archive's entries, in the documented order.
        let archive = ZipArchive::new(Cursor::new(zip.as_slice())).expect("zip");
        let names: Vec<_> = archive.file_names().map(|n| n.expect("name").into_owned()).collect();
        let expected: Vec<String> = std::iter::once("META-INF/MANIFEST.MF".to_owned())
            .chain(
                [
                    "Header",
                    "Directory",
                    "Import",
                    "Applet",
                    "Class",
                    "Method",
                    "StaticField",
                    "ConstantPool",
                    "RefLocation",
                    "Descriptor",
                ]
                .iter()
                .map(|c| format!("tapline/wallet/javacard/{c}.cap")),
            )
            .collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn builder_is_deterministic() {
        let a = wallet_builder().build().expect("builds");
        let b = wallet_builder().build().expect("builds");
        assert_eq!(a, b);
        let c = wallet_builder().package_version(1, 4).build().expect("builds");
        assert_ne!(a, c);
        assert_eq!(
            CapFile::from_bytes(&a).expect("parses").load_file_sha256(false),
            CapFile::from_bytes(&b).expect("parses").load_file_sha256(false)
        );
    }

    #[test]
    fn builder_sizes() {
        let base = CapBuilder::new(&[0xD2, 0x76, 0x00, 0x01, 0x24], "tapline.demo");
        let min = base.min_code_size().expect("min");
        let max = base.max_code_size().expect("max");
        assert!(min < 200, "minimal load file is {min} bytes");
        for target in [0, min, min + 1, min + 2, 1000, 4096, 4097, 30_000, max] {
            let cap = CapFile::from_bytes(&base.clone().code_size(target).build().expect("builds")).expect("parses");
            assert_eq!(cap.load_file_len(false), target.max(min), "target {target}");
            assert_eq!(cap.package_name(), Some("tapline/demo"));
            assert!(cap.applets().is_empty());
            assert_eq!(cap.flags(), 0);
        }
        let err = base.clone().code_size(max + 1).build().expect_err("too big");
        assert!(err.to_string().contains("code_size"), "{err}");
    }

    #[test]
    fn builder_rejects_bad_input() {
        let err = CapBuilder::new(&[1, 2, 3, 4], "a/b").build().expect_err("short AID");
        assert!(err.to_string().contains("package_aid"), "{err}");
        let err = CapBuilder::new(&[1, 2, 3, 4, 5], "a/b").applet(&[0; 17]).build().expect_err("long AID");
        assert!(err.to_string().contains("applet"), "{err}");
        for name in ["", "a//b", "/a", "a/b/", "1a/b", "a b", "a/../b"] {
            let err = CapBuilder::new(&[1, 2, 3, 4, 5], name).build().expect_err("bad name");
            assert!(err.to_string().contains("package_name"), "{name:?}: {err}");
        }
    }

    #[test]
    fn builder_manifest_lines_are_folded() {
        let builder = CapBuilder::new(&[0xA0; 16], "tapline/wallet").applet(&[0xA1; 16]);
        let manifest = builder.manifest();
        for line in manifest.split("\r\n") {
            assert!(line.len() <= 72, "{line:?}");
        }
        let unfolded = manifest.replace("\r\n ", "");
        assert!(unfolded.contains(&format!("Java-Card-Package-AID: {}", ["0xa0"; 16].join(":"))));
        assert!(manifest.ends_with("\r\n\r\n"));
    }
}
