//! Test vectors of the Tapline wallet applet protocol (docs/card-protocol.md,
//! section "Test vectors"). Every expected value is a hex literal computed
//! once from the code and frozen here, so a change to any encoding, digest
//! or signature fails a test; the same literals are in the document, and
//! `the_document_carries_every_vector` keeps the two in step. Further tests
//! check that only the canonical encodings parse, and drive the emulated
//! card to check the status words, lifecycle rules, default selection and
//! self-test results the document's command tables state.

use std::time::Duration;

use card::apdu::{Command, Response};
use card::cap::{CapBuilder, CapFile};
use card::cardid::CardId;
use card::emu::CardFaults;
use card::emu::factory::{ChipFactory, ChipKind, demo_vendor_ca_public};
use card::gp::cplc::Cplc;
use card::gp::keys::StaticKeys;
use card::gp::scp03::SecurityLevel;
use card::gp::session::{GpSession, KeyRing, KeySource};
use card::sw::StatusWord;
use card::transport::emu::EmuBank;
use card::transport::{Atr, CardReader, Transport, TransportError};
use card::wallet::bundle::{
    self, ImportConfirmation, LinkAttestation, Role, TransferBlob, TransferRoute, WalletProof, confirm_digest,
    link_digest, sealed_digest, wallet_proof_digest,
};
use card::wallet::cert::{CERT_VERSION, Certificate, ca_key_id};
use card::wallet::client::WalletClient;
use card::wallet::{
    APPLET_AID, Attestation, Lifecycle, PACKAGE_AID, WalletKeyProof, attestation_digest, domain, memory_pattern,
    message_digest, public_key_bytes, self_test, self_test_digest, sign_digest, verify_digest, wallet_key_digest,
};
use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Fixed inputs.

/// CA private key: 32 bytes of 0x01.
const CA_SECRET: [u8; 32] = [0x01; 32];
/// Card private key: 32 bytes of 0x02.
const CARD_SECRET: [u8; 32] = [0x02; 32];
/// Wallet private key: 32 bytes of 0x03.
const WALLET_SECRET: [u8; 32] = [0x03; 32];
/// IC fabricator 4790, IC type 5040, IC batch 1234, IC serial DEADBEEF.
const CARD_ID: &str = "479050401234deadbeef";
/// CPLC operating system identifier used for the vector CPLC.
const CPLC_OS_ID: [u8; 2] = [0x47, 0x00];
/// Certificate validity: 2024-01-01T00:00:00Z to 2044-01-01T00:00:00Z.
const NOT_BEFORE: u64 = 1_704_067_200;
const NOT_AFTER: u64 = 2_335_219_200;
/// Host challenge: the bytes 00, 01, ..., 1F.
const CHALLENGE: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/// Firmware (load file) hash: the bytes A0, A1, ..., BF.
const FIRMWARE_HASH: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
/// Attestation counters of the two attestation vectors.
const COUNTER_INSTALLED: u32 = 1;
const COUNTER_KEYED: u32 = 7;
/// Self-test vector: the 32 ASCII bytes "TAPLINE self-test vector #000001".
const SELF_TEST_VECTOR: &[u8; 32] = b"TAPLINE self-test vector #000001";
/// Digest the host asks the wallet key to SIGN: SHA-256("abc").
const SIGN_INPUT: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
/// Memory self-test seed and length.
const MEMORY_SEED: [u8; 4] = [0x01, 0x02, 0x03, 0x04];
const MEMORY_LEN: u16 = 100;
/// GET CHALLENGE length of the APDU vector.
const CHALLENGE_LEN: usize = 16;

// Backup linking (section 16). The primary is the card above (CARD_ID, card
// key 02..); the wallet key is 03...
/// The backup's card private key: 32 bytes of 0x04.
const BACKUP_SECRET: [u8; 32] = [0x04; 32];
/// The primary's ephemeral private key of the transfer: 32 bytes of 0x05.
const EPHEMERAL_SECRET: [u8; 32] = [0x05; 32];
/// IC fabricator 4790, IC type 5040, IC batch 5678, IC serial CAFEF00D.
const BACKUP_CARD_ID: &str = "479050405678cafef00d";
/// Bundle id: the bytes C0, C1, ..., CF.
const BUNDLE_ID: &str = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf";
/// The primary's link nonce: the bytes 40, 41, ..., 5F.
const LINK_NONCE: &str = "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f";
/// The transfer's AES-GCM nonce: the bytes 60, 61, ..., 6B.
const GCM_NONCE: &str = "606162636465666768696a6b";
/// Backups announced at LINK PRIMARY.
const BACKUPS_ANNOUNCED: u8 = 2;
/// Owner access code of the APDU vectors: ASCII "246810".
const ACCESS_CODE: &str = "323436383130";

// ---------------------------------------------------------------------------
// Expected outputs (lowercase hex).

const CA_PUBLIC: &str = "031b84c5567b126440995d3ed5aaba0565d71e1834604819ff9c17f5e9d5dd078f";
const CARD_PUBLIC: &str = "024d4b6cd1361032ca9bd2aeb9d900aa4d45d9ead80ac9423374c451a7254d0766";
const WALLET_PUBLIC: &str = "02531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe337";
const CA_KEY_ID: &str = "f1d12012406b87af";
const DEMO_VENDOR_CA_PUBLIC: &str = "02b6684fc5aae553c9098b41b9bc28e9d48917b3f87e2aa4155913a2666c777df1";
const DEMO_VENDOR_CA_KEY_ID: &str = "2921f1cb16384ba3";

const CPLC: &str = "9f7f2a479050404700621001006220deadbeef1234000000000000000000000000000000000000000000000000";

const EMPTY_DIGEST_CERT: &str = "89e9d1e0e4aef29e322b58e768d637d0911a6542e4e0ace6dd8fd5b6ded621cf";
const EMPTY_DIGEST_ATTEST: &str = "d7830dc2e81565ff3e4064de2f6dc3642875375115ffdfc521eb90d7ac43ec96";
const EMPTY_DIGEST_WALLET_KEY: &str = "448f4321b87e8e54f6e7169d634642230d21bb8e6d40d060778018fc2657b6d9";
const EMPTY_DIGEST_SELF_TEST: &str = "c4fa083914c7cbb3a1ea0c6325c8a7e14f7ccbf0a8882e0922dac32b5b1a2beb";
const EMPTY_DIGEST_MEMORY_PATTERN: &str = "4af9b668c514eaa4fecdb791a30587eb0347b01e80b3e595b7db3138cd3e1f2d";

const CERT_TBS: &str = "5f2901014208f1d12012406b87af5f200a479050401234deadbeef7f49238621024d4b6cd1361032ca9bd2aeb9d900aa4d45d9ead80ac9423374c451a7254d07665f250800000000659200805f2408000000008b309e00";
const CERT_TBS_DIGEST: &str = "0d9556d34b79fde8c8c815ae509d7914dd2362ec25463dee251d0543443db468";
const CERT_SIGNATURE: &str = "e68be099bb76b7791d7da072fa6defc0d3df3f7d0716a12bd04a120c82129cce04475172e030c06ebc34b72078616cb96af38980370ffc9e27d6a2651405469d";
const CERT: &str = "7f21819a5f2901014208f1d12012406b87af5f200a479050401234deadbeef7f49238621024d4b6cd1361032ca9bd2aeb9d900aa4d45d9ead80ac9423374c451a7254d07665f250800000000659200805f2408000000008b309e005f3740e68be099bb76b7791d7da072fa6defc0d3df3f7d0716a12bd04a120c82129cce04475172e030c06ebc34b72078616cb96af38980370ffc9e27d6a2651405469d";

const ATTEST_INSTALLED_PREIMAGE: &str = "00115441504c494e452f6174746573742f76310020000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f000a479050401234deadbeef0004000000010001010020a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf0000";
const ATTEST_INSTALLED_DIGEST: &str = "496532e9836d6bbf059690f464d34275a18afa955e0dc2334fec1fd03c247806";
const ATTEST_INSTALLED_SIGNATURE: &str = "3add9841d40783d1fbd6d4e61ad801118375339dffd55949cfc8f6d0acfb3a35451ca716c702a59a1eb9ac52073c4a62b92282779ca9db125f201708e5267bf2";
const ATTEST_INSTALLED_RESPONSE: &str = "800a479050401234deadbeef8104000000018201018320a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf9e403add9841d40783d1fbd6d4e61ad801118375339dffd55949cfc8f6d0acfb3a35451ca716c702a59a1eb9ac52073c4a62b92282779ca9db125f201708e5267bf2";
const ATTEST_KEYED_PREIMAGE: &str = "00115441504c494e452f6174746573742f76310020000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f000a479050401234deadbeef0004000000070001030020a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf002102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe337";
const ATTEST_KEYED_DIGEST: &str = "278a0c9196518963c5ef3dea1fa0e8da847eb6f66492fc9fee620ebb5f46afd2";
const ATTEST_KEYED_SIGNATURE: &str = "ef3e212d01b49c53d4684cbbd825438195a6f574c3777c5a7aa2e24abd7097cc02a9e3702cf91eac5ee1d2bc9af6658d5aa578eb01d01e31f89be481a60b52ee";
const ATTEST_KEYED_RESPONSE: &str = "800a479050401234deadbeef8104000000078201038320a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf842102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe3379e40ef3e212d01b49c53d4684cbbd825438195a6f574c3777c5a7aa2e24abd7097cc02a9e3702cf91eac5ee1d2bc9af6658d5aa578eb01d01e31f89be481a60b52ee";
const ATTEST_KEYED_SIGNATURE_HIGH_S: &str = "ef3e212d01b49c53d4684cbbd825438195a6f574c3777c5a7aa2e24abd7097ccfd561c8fd306e153a11e2d4365099a71600963fbad788209c7367a0b2a2aee53";

const WALLET_KEY_PREIMAGE: &str = "00155441504c494e452f77616c6c65742d6b65792f7631000a479050401234deadbeef002102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe337";
const WALLET_KEY_DIGEST: &str = "8a7f918017bfc6c7f1c2e04ff9faae78ec2f73bd3ce7c023d9a7998f60a8bfad";
const WALLET_KEY_SIGNATURE: &str = "298bcb99503d556000f8f67b717beb21166f76ffce801ebdbc42e8ba4e19548f03838f4830c223258bc6965e99cfc6fb6fae770374348092627d2f83da8f2f1b";
const WALLET_KEY_RESPONSE: &str = "842102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe3379e40298bcb99503d556000f8f67b717beb21166f76ffce801ebdbc42e8ba4e19548f03838f4830c223258bc6965e99cfc6fb6fae770374348092627d2f83da8f2f1b";

const SIGN_SIGNATURE: &str = "b9965d92ed76d342ecfeb4e3b5f24096fae0e1d30b28bba5dfdd49b3842ee06f7c21c7a9eb33c81cdeaa94d9bcc94a740fbd9893bc17825794f3b86ef82b7045";
const SIGN_RESPONSE: &str = "9e40b9965d92ed76d342ecfeb4e3b5f24096fae0e1d30b28bba5dfdd49b3842ee06f7c21c7a9eb33c81cdeaa94d9bcc94a740fbd9893bc17825794f3b86ef82b7045";

const SELF_TEST_DIGEST: &str = "89ca7bdf9553b92e393845d1d8fccc0023245a8c5f7895646e25c2d1bf8deaa7";
const SELF_TEST_SIGNATURE: &str = "f03f149eee2ed8132f476208018f7c5bcfac28400da5592c0e6e878ba40ffb007a3d542c0dae88bb951b26d78bd53e73780203a810f5affac36057f944a57dbe";
const SELF_TEST_RESPONSE: &str = "9e40f03f149eee2ed8132f476208018f7c5bcfac28400da5592c0e6e878ba40ffb007a3d542c0dae88bb951b26d78bd53e73780203a810f5affac36057f944a57dbe";
const KAT_RESPONSE_ALL: &str = "86011f";
const KAT_RESPONSE_STUCK_RNG: &str = "86010f";

const MEMORY_PATTERN_FIRST_32: &str = "df651505fe76301b3a5489db4c92b5250cef705f36c92b47fc593933f389b663";
const MEMORY_RESPONSE: &str = "87209ebe2958043ef3a2b00ae1c738f7c16961cc964079c0db4acebfab373e2cee4d";

const SELECT_RESPONSE_KEYED: &str = "8501018201038a0101";

const APDU_SELECT: &str = "00a4040009f05441504c494e450100";
const APDU_GET_IDENTITY: &str = "8010000000";
const APDU_ATTEST: &str = "8012000020000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00";
const APDU_GENERATE_WALLET_KEY: &str = "8020000000";
const APDU_GET_WALLET_KEY: &str = "8022000000";
const APDU_SIGN: &str = "8030000020ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad00";
const APDU_SELF_TEST_KAT: &str = "8040010000";
const APDU_SELF_TEST_SIGN: &str = "80400200205441504c494e452073656c662d7465737420766563746f72202330303030303100";
const APDU_SELF_TEST_MEMORY: &str = "804003000601020304006400";
const APDU_GET_CHALLENGE: &str = "0084000010";
const APDU_GET_DATA_IDENTITY: &str = "80ca7f2100";
const APDU_GET_DATA_CPLC: &str = "80ca9f7f00";

// Backup linking outputs.
const BACKUP_CARD_PUBLIC: &str = "03462779ad4aad39514614751a71085f2f10e1c7a593e4e030efb5b8721ce55b0b";
const EPHEMERAL_PUBLIC: &str = "0362c0a046dacce86ddd0343c6d3c7c79c2208ba0d9c9cf24a6d046d21d21f90f7";
const BACKUP_CERT: &str = "7f21819a5f2901014208f1d12012406b87af5f200a479050405678cafef00d7f4923862103462779ad4aad39514614751a71085f2f10e1c7a593e4e030efb5b8721ce55b0b5f250800000000659200805f2408000000008b309e005f3740cca2833285fc7adb17b15b6152b475872d0301cab962b9c5eba74679c0597b551d6e392af77af5ad9b0a1df68e49102221be4d12c9ca85e174947c3053ed2c53";
const EMPTY_DIGEST_LINK: &str = "f117c74cd544aa66cf201237057db02fffcd89c748c52f69aec51cf463107afc";
const EMPTY_DIGEST_TRANSFER: &str = "a537d097ac0a5c8a30f4c232c7ca89bf76eb015be525b2640aae01c6f769c8f3";
const EMPTY_DIGEST_CONFIRM: &str = "e458763777140ae79ebe6e4cb5514de252c5e5dfe528ca920a1e9cb207c40357";
const EMPTY_DIGEST_WALLET_PROOF: &str = "806745568195572b861e9c809603029b02993376021d668b217c80d60bb4fea0";
const EMPTY_DIGEST_SEALED: &str = "531a3f8803b184a514bbd8b5d9b75597d95c4697b129037a5dbd2a7b30108566";
const LINK_PRIMARY_RESPONSE: &str = "8b20404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f";
const LINK_PREIMAGE: &str = "000f5441504c494e452f6c696e6b2f76310010c0c1c2c3c4c5c6c7c8c9cacbcccdcecf000a479050401234deadbeef0020404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f000a479050405678cafef00d0020a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf000107";
const LINK_DIGEST: &str = "78644ec15d1b4fd2edca932c0b486e77cb2c3fb011851671fc4b69924f0151e8";
const LINK_SIGNATURE: &str = "0e0d34a5eabe8548eae492962aba5c67c6361acda7f357c0504c9fd41daf67726d441ff1ff5a304ddb0c526007a79c159459c65085c1fe497d53624fc64cf086";
const LINK_ATTESTATION_RESPONSE: &str = "800a479050405678cafef00d8320a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf9e400e0d34a5eabe8548eae492962aba5c67c6361acda7f357c0504c9fd41daf67726d441ff1ff5a304ddb0c526007a79c159459c65085c1fe497d53624fc64cf086";
const TRANSFER_SHARED_X: &str = "c2c043b455f384ffcca06d2c0c8cbb4bb435bc6f6725ff6b20ff30fbdcf8f703";
const TRANSFER_KEY: &str = "9bd82affc455f50b4ca5aba4581b9e56d63488776c5748cf9096e19c5a1abf0b";
const TRANSFER_AAD: &str = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf479050401234deadbeef479050405678cafef00d02531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe337";
const TRANSFER_CIPHERTEXT: &str =
    "34645b23931b7122a4251606e1031f11fd8c2a8cb52feaced73d1a58fcca998f1d7926240d0c9e6f8e23ec38934d6dd0";
const TRANSFER_PREIMAGE: &str = "00135441504c494e452f7472616e736665722f76310010c0c1c2c3c4c5c6c7c8c9cacbcccdcecf000a479050401234deadbeef000a479050405678cafef00d002102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe33700210362c0a046dacce86ddd0343c6d3c7c79c2208ba0d9c9cf24a6d046d21d21f90f7000c606162636465666768696a6b003034645b23931b7122a4251606e1031f11fd8c2a8cb52feaced73d1a58fcca998f1d7926240d0c9e6f8e23ec38934d6dd0";
const TRANSFER_DIGEST: &str = "94f9252848c62236e0bf8cdc9ac84879a1dcd5b4a4eeebd44dab75c9083e8493";
const TRANSFER_SIGNATURE: &str = "aa3d1f7458bd8a151f385f0a0655c0e9fca2c6c8e114e07f209d31db4ee5cd7f385c17829399f2505bb39770a48a491b9948f955173cb1133d44c64b89d34be1";
const TRANSFER_BLOB: &str = "8910c0c1c2c3c4c5c6c7c8c9cacbcccdcecf8c0a479050401234deadbeef8d0a479050405678cafef00d842102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe3378e210362c0a046dacce86ddd0343c6d3c7c79c2208ba0d9c9cf24a6d046d21d21f90f78f0c606162636465666768696a6b903034645b23931b7122a4251606e1031f11fd8c2a8cb52feaced73d1a58fcca998f1d7926240d0c9e6f8e23ec38934d6dd09e40aa3d1f7458bd8a151f385f0a0655c0e9fca2c6c8e114e07f209d31db4ee5cd7f385c17829399f2505bb39770a48a491b9948f955173cb1133d44c64b89d34be1";
const CONFIRM_DIGEST: &str = "77eda4efe8e2bb199f69eb7e80c8da2a1a28d18adf3634e5cea1a72c94a0e7da";
const CONFIRM_SIGNATURE: &str = "589251dcfe5cc92416855664a3163b58a53db2b682ee8ac454961a592ea092cb2a4f4727b95a91c86d33f82d1946bfae54b1adae6533386b0e98041fa2912c53";
const CONFIRM_RESPONSE: &str = "800a479050405678cafef00d842102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe3379e40589251dcfe5cc92416855664a3163b58a53db2b682ee8ac454961a592ea092cb2a4f4727b95a91c86d33f82d1946bfae54b1adae6533386b0e98041fa2912c53";
const WALLET_PROOF_DIGEST: &str = "be1ae0ad6894b3e1b95b85fc3b60640e7210f42f21f189fa12651058f86a126a";
const WALLET_PROOF_SIGNATURE: &str = "456fcc03a7ea2c9fb582f5370df911b2f1d1814209591c90578324d1f73565b8759d058044c04f502cefd478695c62dc9461b8f540508a3d809fd2f046ce19ae";
const WALLET_PROOF_RESPONSE: &str = "842102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe3379e40456fcc03a7ea2c9fb582f5370df911b2f1d1814209591c90578324d1f73565b8759d058044c04f502cefd478695c62dc9461b8f540508a3d809fd2f046ce19ae";
const WALLET_PROOF_DIGEST_UNBUNDLED: &str = "ad12f64cad21cec1ac0f76befc4231133e31ba0388d9062b3bdc4646885931ef";
const SEALED_DIGEST_PRIMARY: &str = "7ad309c0a5e72cc276349cc68d72e9026bb99ac89962cab2b73d6ee940c56a09";
const SEALED_SIGNATURE_PRIMARY: &str = "85d109824609cd6a0601abcb4888974ca2e8fbb59f6bcd569b1650f6f444ade00316c078a234b78180663f6434557836d81739fd2e81598e49161779dbcc822d";
const FINALIZE_RESPONSE_PRIMARY: &str = "9e4085d109824609cd6a0601abcb4888974ca2e8fbb59f6bcd569b1650f6f444ade00316c078a234b78180663f6434557836d81739fd2e81598e49161779dbcc822d";
const SEALED_DIGEST_BACKUP: &str = "c7fadbf4d9417b071275ccf5fad626849be67be71bc93054d1d42dc5bcafb809";
const SEALED_SIGNATURE_BACKUP: &str = "790d9eb69b421abf88115c1f72ce083816d3bad8405cfc261280729c85dbc75b22ea84e4b93f39cd132f37fb82c3d6e7475b6f2fa1c6749e36eef42401f62052";
const SELECT_RESPONSE_LINKED_BACKUP: &str = "8501018201078a01008801028910c0c1c2c3c4c5c6c7c8c9cacbcccdcecf";
const APDU_LINK_PRIMARY: &str = "8024000011c0c1c2c3c4c5c6c7c8c9cacbcccdcecf0200";
const APDU_LINK_BACKUP: &str = "80250000cec0c1c2c3c4c5c6c7c8c9cacbcccdcecf404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f7f21819a5f2901014208f1d12012406b87af5f200a479050401234deadbeef7f49238621024d4b6cd1361032ca9bd2aeb9d900aa4d45d9ead80ac9423374c451a7254d07665f250800000000659200805f2408000000008b309e005f3740e68be099bb76b7791d7da072fa6defc0d3df3f7d0716a12bd04a120c82129cce04475172e030c06ebc34b72078616cb96af38980370ffc9e27d6a2651405469d00";
const APDU_ADD_BACKUP_1: &str = "90260000ff7f21819a5f2901014208f1d12012406b87af5f200a479050405678cafef00d7f4923862103462779ad4aad39514614751a71085f2f10e1c7a593e4e030efb5b8721ce55b0b5f250800000000659200805f2408000000008b309e005f3740cca2833285fc7adb17b15b6152b475872d0301cab962b9c5eba74679c0597b551d6e392af77af5ad9b0a1df68e49102221be4d12c9ca85e174947c3053ed2c53800a479050405678cafef00d8320a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf9e400e0d34a5eabe8548eae492962aba5c67c6361acda7f357c0504c9fd41daf67726d441ff1ff5a304ddb0c526007a79c1594";
const APDU_ADD_BACKUP_2: &str = "802600000f59c65085c1fe497d53624fc64cf086";
const APDU_EXPORT: &str = "802700000a479050405678cafef00d00";
const APDU_IMPORT: &str = "80280000f28910c0c1c2c3c4c5c6c7c8c9cacbcccdcecf8c0a479050401234deadbeef8d0a479050405678cafef00d842102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe3378e210362c0a046dacce86ddd0343c6d3c7c79c2208ba0d9c9cf24a6d046d21d21f90f78f0c606162636465666768696a6b903034645b23931b7122a4251606e1031f11fd8c2a8cb52feaced73d1a58fcca998f1d7926240d0c9e6f8e23ec38934d6dd09e40aa3d1f7458bd8a151f385f0a0655c0e9fca2c6c8e114e07f209d31db4ee5cd7f385c17829399f2505bb39770a48a491b9948f955173cb1133d44c64b89d34be100";
const APDU_CONFIRM_BACKUP: &str = "8029000071800a479050405678cafef00d842102531fe6068134503d2723133227c867ac8fa6c83c537e9a44c3c5bdbdcb1fe3379e40589251dcfe5cc92416855664a3163b58a53db2b682ee8ac454961a592ea092cb2a4f4727b95a91c86d33f82d1946bfae54b1adae6533386b0e98041fa2912c53";
const APDU_PROVE_WALLET: &str = "802a000020000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00";
const APDU_FINALIZE: &str = "802b000000";
const APDU_ABORT_BUNDLE: &str = "802c0000";
const APDU_SET_ACCESS_CODE: &str = "802d000006323436383130";
const APDU_VERIFY_ACCESS_CODE: &str = "0020008106323436383130";

/// Every hex literal of this file, by name: the document must carry each.
const ALL_HEX: &[(&str, &str)] = &[
    ("CARD_ID", CARD_ID),
    ("CHALLENGE", CHALLENGE),
    ("FIRMWARE_HASH", FIRMWARE_HASH),
    ("SIGN_INPUT", SIGN_INPUT),
    ("CA_PUBLIC", CA_PUBLIC),
    ("CARD_PUBLIC", CARD_PUBLIC),
    ("WALLET_PUBLIC", WALLET_PUBLIC),
    ("CA_KEY_ID", CA_KEY_ID),
    ("DEMO_VENDOR_CA_PUBLIC", DEMO_VENDOR_CA_PUBLIC),
    ("DEMO_VENDOR_CA_KEY_ID", DEMO_VENDOR_CA_KEY_ID),
    ("CPLC", CPLC),
    ("EMPTY_DIGEST_CERT", EMPTY_DIGEST_CERT),
    ("EMPTY_DIGEST_ATTEST", EMPTY_DIGEST_ATTEST),
    ("EMPTY_DIGEST_WALLET_KEY", EMPTY_DIGEST_WALLET_KEY),
    ("EMPTY_DIGEST_SELF_TEST", EMPTY_DIGEST_SELF_TEST),
    ("EMPTY_DIGEST_MEMORY_PATTERN", EMPTY_DIGEST_MEMORY_PATTERN),
    ("CERT_TBS", CERT_TBS),
    ("CERT_TBS_DIGEST", CERT_TBS_DIGEST),
    ("CERT_SIGNATURE", CERT_SIGNATURE),
    ("CERT", CERT),
    ("ATTEST_INSTALLED_PREIMAGE", ATTEST_INSTALLED_PREIMAGE),
    ("ATTEST_INSTALLED_DIGEST", ATTEST_INSTALLED_DIGEST),
    ("ATTEST_INSTALLED_SIGNATURE", ATTEST_INSTALLED_SIGNATURE),
    ("ATTEST_INSTALLED_RESPONSE", ATTEST_INSTALLED_RESPONSE),
    ("ATTEST_KEYED_PREIMAGE", ATTEST_KEYED_PREIMAGE),
    ("ATTEST_KEYED_DIGEST", ATTEST_KEYED_DIGEST),
    ("ATTEST_KEYED_SIGNATURE", ATTEST_KEYED_SIGNATURE),
    ("ATTEST_KEYED_RESPONSE", ATTEST_KEYED_RESPONSE),
    ("ATTEST_KEYED_SIGNATURE_HIGH_S", ATTEST_KEYED_SIGNATURE_HIGH_S),
    ("WALLET_KEY_PREIMAGE", WALLET_KEY_PREIMAGE),
    ("WALLET_KEY_DIGEST", WALLET_KEY_DIGEST),
    ("WALLET_KEY_SIGNATURE", WALLET_KEY_SIGNATURE),
    ("WALLET_KEY_RESPONSE", WALLET_KEY_RESPONSE),
    ("SIGN_SIGNATURE", SIGN_SIGNATURE),
    ("SIGN_RESPONSE", SIGN_RESPONSE),
    ("SELF_TEST_DIGEST", SELF_TEST_DIGEST),
    ("SELF_TEST_SIGNATURE", SELF_TEST_SIGNATURE),
    ("SELF_TEST_RESPONSE", SELF_TEST_RESPONSE),
    ("KAT_RESPONSE_ALL", KAT_RESPONSE_ALL),
    ("KAT_RESPONSE_STUCK_RNG", KAT_RESPONSE_STUCK_RNG),
    ("MEMORY_PATTERN_FIRST_32", MEMORY_PATTERN_FIRST_32),
    ("MEMORY_RESPONSE", MEMORY_RESPONSE),
    ("SELECT_RESPONSE_KEYED", SELECT_RESPONSE_KEYED),
    ("APDU_SELECT", APDU_SELECT),
    ("APDU_GET_IDENTITY", APDU_GET_IDENTITY),
    ("APDU_ATTEST", APDU_ATTEST),
    ("APDU_GENERATE_WALLET_KEY", APDU_GENERATE_WALLET_KEY),
    ("APDU_GET_WALLET_KEY", APDU_GET_WALLET_KEY),
    ("APDU_SIGN", APDU_SIGN),
    ("APDU_SELF_TEST_KAT", APDU_SELF_TEST_KAT),
    ("APDU_SELF_TEST_SIGN", APDU_SELF_TEST_SIGN),
    ("APDU_SELF_TEST_MEMORY", APDU_SELF_TEST_MEMORY),
    ("APDU_GET_CHALLENGE", APDU_GET_CHALLENGE),
    ("APDU_GET_DATA_IDENTITY", APDU_GET_DATA_IDENTITY),
    ("APDU_GET_DATA_CPLC", APDU_GET_DATA_CPLC),
    ("BACKUP_CARD_ID", BACKUP_CARD_ID),
    ("BUNDLE_ID", BUNDLE_ID),
    ("LINK_NONCE", LINK_NONCE),
    ("GCM_NONCE", GCM_NONCE),
    ("ACCESS_CODE", ACCESS_CODE),
    ("BACKUP_CARD_PUBLIC", BACKUP_CARD_PUBLIC),
    ("EPHEMERAL_PUBLIC", EPHEMERAL_PUBLIC),
    ("BACKUP_CERT", BACKUP_CERT),
    ("EMPTY_DIGEST_LINK", EMPTY_DIGEST_LINK),
    ("EMPTY_DIGEST_TRANSFER", EMPTY_DIGEST_TRANSFER),
    ("EMPTY_DIGEST_CONFIRM", EMPTY_DIGEST_CONFIRM),
    ("EMPTY_DIGEST_WALLET_PROOF", EMPTY_DIGEST_WALLET_PROOF),
    ("EMPTY_DIGEST_SEALED", EMPTY_DIGEST_SEALED),
    ("LINK_PRIMARY_RESPONSE", LINK_PRIMARY_RESPONSE),
    ("LINK_PREIMAGE", LINK_PREIMAGE),
    ("LINK_DIGEST", LINK_DIGEST),
    ("LINK_SIGNATURE", LINK_SIGNATURE),
    ("LINK_ATTESTATION_RESPONSE", LINK_ATTESTATION_RESPONSE),
    ("TRANSFER_SHARED_X", TRANSFER_SHARED_X),
    ("TRANSFER_KEY", TRANSFER_KEY),
    ("TRANSFER_AAD", TRANSFER_AAD),
    ("TRANSFER_CIPHERTEXT", TRANSFER_CIPHERTEXT),
    ("TRANSFER_PREIMAGE", TRANSFER_PREIMAGE),
    ("TRANSFER_DIGEST", TRANSFER_DIGEST),
    ("TRANSFER_SIGNATURE", TRANSFER_SIGNATURE),
    ("TRANSFER_BLOB", TRANSFER_BLOB),
    ("CONFIRM_DIGEST", CONFIRM_DIGEST),
    ("CONFIRM_SIGNATURE", CONFIRM_SIGNATURE),
    ("CONFIRM_RESPONSE", CONFIRM_RESPONSE),
    ("WALLET_PROOF_DIGEST", WALLET_PROOF_DIGEST),
    ("WALLET_PROOF_SIGNATURE", WALLET_PROOF_SIGNATURE),
    ("WALLET_PROOF_RESPONSE", WALLET_PROOF_RESPONSE),
    ("WALLET_PROOF_DIGEST_UNBUNDLED", WALLET_PROOF_DIGEST_UNBUNDLED),
    ("SEALED_DIGEST_PRIMARY", SEALED_DIGEST_PRIMARY),
    ("SEALED_SIGNATURE_PRIMARY", SEALED_SIGNATURE_PRIMARY),
    ("FINALIZE_RESPONSE_PRIMARY", FINALIZE_RESPONSE_PRIMARY),
    ("SEALED_DIGEST_BACKUP", SEALED_DIGEST_BACKUP),
    ("SEALED_SIGNATURE_BACKUP", SEALED_SIGNATURE_BACKUP),
    ("SELECT_RESPONSE_LINKED_BACKUP", SELECT_RESPONSE_LINKED_BACKUP),
    ("APDU_LINK_PRIMARY", APDU_LINK_PRIMARY),
    ("APDU_LINK_BACKUP", APDU_LINK_BACKUP),
    ("APDU_ADD_BACKUP_1", APDU_ADD_BACKUP_1),
    ("APDU_ADD_BACKUP_2", APDU_ADD_BACKUP_2),
    ("APDU_EXPORT", APDU_EXPORT),
    ("APDU_IMPORT", APDU_IMPORT),
    ("APDU_CONFIRM_BACKUP", APDU_CONFIRM_BACKUP),
    ("APDU_PROVE_WALLET", APDU_PROVE_WALLET),
    ("APDU_FINALIZE", APDU_FINALIZE),
    ("APDU_ABORT_BUNDLE", APDU_ABORT_BUNDLE),
    ("APDU_SET_ACCESS_CODE", APDU_SET_ACCESS_CODE),
    ("APDU_VERIFY_ACCESS_CODE", APDU_VERIFY_ACCESS_CODE),
];

// ---------------------------------------------------------------------------
// Helpers.

/// Asserts that `got` hex-encodes to the frozen literal `$name`.
macro_rules! pin {
    ($name:ident, $got:expr) => {{
        let got = hex::encode($got);
        assert_eq!(got, $name, "{} changed: this is a protocol change (docs/card-protocol.md)", stringify!($name));
    }};
}

fn key(secret: &[u8; 32]) -> SigningKey {
    SigningKey::from_slice(secret).expect("the fixed secrets are valid secp256k1 scalars")
}

fn bytes<const N: usize>(hex_text: &str) -> [u8; N] {
    let v = hex::decode(hex_text).expect("input literals are hex");
    v.try_into().expect("input literal has the documented length")
}

fn card_id() -> CardId {
    CardId(bytes(CARD_ID))
}

fn wallet_public() -> [u8; 33] {
    public_key_bytes(key(&WALLET_SECRET).verifying_key())
}

fn certificate() -> Certificate {
    Certificate::issue(&key(&CA_SECRET), card_id(), key(&CARD_SECRET).verifying_key(), NOT_BEFORE, NOT_AFTER)
}

/// The message_digest framing written out by hand: u16 big-endian length
/// and bytes of the domain, then of each part.
fn framed(domain: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in std::iter::once(domain).chain(parts.iter().copied()) {
        out.extend_from_slice(&u16::try_from(item.len()).expect("short part").to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// n - s over the secp256k1 group order: the high-S twin of a low-S value.
fn negate_mod_n(s: &[u8]) -> [u8; 32] {
    const N: [u8; 32] = [
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, 0xBA, 0xAE,
        0xDC, 0xE6, 0xAF, 0x48, 0xA0, 0x3B, 0xBF, 0xD2, 0x5E, 0x8C, 0xD0, 0x36, 0x41, 0x41,
    ];
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        out[i] = u8::try_from(d).expect("a byte");
    }
    assert_eq!(borrow, 0, "s < n");
    out
}

// ---------------------------------------------------------------------------
// Vectors.

#[test]
fn keys_and_ca_key_ids() {
    pin!(CA_PUBLIC, public_key_bytes(key(&CA_SECRET).verifying_key()));
    pin!(CARD_PUBLIC, public_key_bytes(key(&CARD_SECRET).verifying_key()));
    pin!(WALLET_PUBLIC, wallet_public());
    pin!(CA_KEY_ID, ca_key_id(key(&CA_SECRET).verifying_key()));
    // ca_key_id is the first 8 bytes of SHA-256 over the compressed point.
    let h = Sha256::digest(bytes::<33>(CA_PUBLIC));
    assert_eq!(hex::encode(&h[..8]), CA_KEY_ID);
    // The DEMO ONLY vendor CA the emulator's genuine chips chain to.
    let demo = demo_vendor_ca_public();
    pin!(DEMO_VENDOR_CA_PUBLIC, public_key_bytes(&demo));
    pin!(DEMO_VENDOR_CA_KEY_ID, ca_key_id(&demo));
}

#[test]
fn card_id_comes_from_cplc() {
    let cplc = Cplc::for_card(&card_id(), CPLC_OS_ID);
    pin!(CPLC, cplc.encode());
    let parsed = Cplc::parse(&bytes::<45>(CPLC)).expect("vector CPLC parses");
    assert_eq!(parsed.card_id(), card_id());
    // Fabricator, type, batch (CPLC bytes 16..18), serial (CPLC bytes 12..16).
    let raw = &bytes::<45>(CPLC)[3..];
    let mut id = Vec::new();
    for range in [0..2, 2..4, 16..18, 12..16] {
        id.extend_from_slice(&raw[range]);
    }
    assert_eq!(hex::encode(id), CARD_ID);
}

#[test]
fn message_digest_framing_and_domains() {
    pin!(EMPTY_DIGEST_CERT, message_digest(domain::CERT, &[]));
    pin!(EMPTY_DIGEST_ATTEST, message_digest(domain::ATTEST, &[]));
    pin!(EMPTY_DIGEST_WALLET_KEY, message_digest(domain::WALLET_KEY, &[]));
    pin!(EMPTY_DIGEST_SELF_TEST, message_digest(domain::SELF_TEST, &[]));
    pin!(EMPTY_DIGEST_MEMORY_PATTERN, message_digest(domain::MEMORY_PATTERN, &[]));
    assert_eq!(domain::CERT, b"TAPLINE/cert/v1");
    assert_eq!(domain::ATTEST, b"TAPLINE/attest/v1");
    assert_eq!(domain::WALLET_KEY, b"TAPLINE/wallet-key/v1");
    assert_eq!(domain::SELF_TEST, b"TAPLINE/self-test/v1");
    assert_eq!(domain::MEMORY_PATTERN, b"TAPLINE/memory-pattern/v1");
    // An empty part is framed as 00 00 and is not the same as no part.
    assert_ne!(message_digest(domain::ATTEST, &[]), message_digest(domain::ATTEST, &[&[]]));
    assert_eq!(
        message_digest(domain::ATTEST, &[&[]]),
        <[u8; 32]>::from(Sha256::digest(framed(domain::ATTEST, &[&[]])))
    );
}

#[test]
fn identity_certificate() {
    let cert = certificate();
    assert_eq!(cert.version, CERT_VERSION);
    let encoded = cert.encode();
    pin!(CERT, &encoded);
    pin!(CERT_SIGNATURE, cert.signature);
    // The TBS is the body of 7F21 (after 7F 21 81 9A) up to the signature object.
    assert_eq!(encoded.len(), 158);
    assert_eq!(&encoded[..4], [0x7F, 0x21, 0x81, 0x9A]);
    let tbs = &encoded[4..encoded.len() - 67];
    assert_eq!(&encoded[encoded.len() - 67..encoded.len() - 64], [0x5F, 0x37, 0x40]);
    pin!(CERT_TBS, tbs);
    // Six objects in order; the key is a template 7F49 { 86 <33-byte point> }.
    let fields = card::tlv::parse_all(tbs).expect("TBS is TLV");
    assert_eq!(fields.iter().map(|f| f.tag).collect::<Vec<u32>>(), [0x5F29, 0x42, 0x5F20, 0x7F49, 0x5F25, 0x5F24]);
    let key_template = fields[3].children().expect("7F49 is a template");
    assert_eq!(key_template.len(), 1);
    assert_eq!((key_template[0].tag, key_template[0].value), (0x86, &bytes::<33>(CARD_PUBLIC)[..]));
    let tbs_digest = message_digest(domain::CERT, &[tbs]);
    pin!(CERT_TBS_DIGEST, tbs_digest);
    let ca = *key(&CA_SECRET).verifying_key();
    assert!(verify_digest(&ca, &tbs_digest, &cert.signature));
    // Parsing gives the same certificate; verification at the validity bounds.
    let parsed = Certificate::parse(&bytes::<158>(CERT)).expect("vector certificate parses");
    assert_eq!(parsed, cert);
    let (card_key, index) = parsed.verify(&[ca], NOT_BEFORE).expect("valid at notBefore");
    assert_eq!(index, 0);
    assert_eq!(public_key_bytes(&card_key), bytes::<33>(CARD_PUBLIC));
    assert!(parsed.verify(&[ca], NOT_AFTER).is_ok(), "valid at notAfter (inclusive)");
    assert!(parsed.verify(&[ca], NOT_BEFORE - 1).is_err(), "not yet valid");
    assert!(parsed.verify(&[ca], NOT_AFTER + 1).is_err(), "expired");
    assert!(parsed.verify(&[*key(&CARD_SECRET).verifying_key()], NOT_BEFORE).is_err(), "unpinned issuer");
}

#[test]
fn attestation_of_an_installed_card() {
    let challenge = bytes::<32>(CHALLENGE);
    let firmware = bytes::<32>(FIRMWARE_HASH);
    let id = card_id();
    let counter = COUNTER_INSTALLED.to_be_bytes();
    let lifecycle = [Lifecycle::Installed as u8];
    let preimage = framed(domain::ATTEST, &[&challenge, id.as_bytes(), &counter, &lifecycle, &firmware, &[]]);
    pin!(ATTEST_INSTALLED_PREIMAGE, &preimage);
    let digest = attestation_digest(&challenge, &id, COUNTER_INSTALLED, lifecycle[0], &firmware, None);
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&preimage)));
    pin!(ATTEST_INSTALLED_DIGEST, digest);
    let signature = sign_digest(&key(&CARD_SECRET), &digest);
    pin!(ATTEST_INSTALLED_SIGNATURE, signature);
    let att = Attestation {
        card_id: id,
        counter: COUNTER_INSTALLED,
        lifecycle: lifecycle[0],
        firmware_hash: firmware,
        wallet_key: None,
        signature,
    };
    pin!(ATTEST_INSTALLED_RESPONSE, att.encode());
    let parsed = Attestation::parse(&hex::decode(ATTEST_INSTALLED_RESPONSE).expect("hex")).expect("parses");
    assert_eq!(parsed, att);
    assert!(verify_digest(key(&CARD_SECRET).verifying_key(), &parsed.digest(&challenge), &parsed.signature));
}

#[test]
fn attestation_of_a_keyed_card() {
    let challenge = bytes::<32>(CHALLENGE);
    let firmware = bytes::<32>(FIRMWARE_HASH);
    let id = card_id();
    let wallet = wallet_public();
    let counter = COUNTER_KEYED.to_be_bytes();
    let lifecycle = [Lifecycle::Keyed as u8];
    let preimage = framed(domain::ATTEST, &[&challenge, id.as_bytes(), &counter, &lifecycle, &firmware, &wallet]);
    pin!(ATTEST_KEYED_PREIMAGE, &preimage);
    let digest = attestation_digest(&challenge, &id, COUNTER_KEYED, lifecycle[0], &firmware, Some(&wallet));
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&preimage)));
    pin!(ATTEST_KEYED_DIGEST, digest);
    let signature = sign_digest(&key(&CARD_SECRET), &digest);
    pin!(ATTEST_KEYED_SIGNATURE, signature);
    let att = Attestation {
        card_id: id,
        counter: COUNTER_KEYED,
        lifecycle: lifecycle[0],
        firmware_hash: firmware,
        wallet_key: Some(wallet),
        signature,
    };
    pin!(ATTEST_KEYED_RESPONSE, att.encode());
    let parsed = Attestation::parse(&hex::decode(ATTEST_KEYED_RESPONSE).expect("hex")).expect("parses");
    assert_eq!(parsed, att);
    let card_key = *key(&CARD_SECRET).verifying_key();
    assert!(verify_digest(&card_key, &parsed.digest(&challenge), &parsed.signature));
    // The same response under another challenge, counter or lifecycle fails.
    assert!(!verify_digest(&card_key, &parsed.digest(&[0u8; 32]), &parsed.signature), "replay");
    let mut older = parsed.clone();
    older.counter = COUNTER_KEYED - 1;
    assert!(!verify_digest(&card_key, &older.digest(&challenge), &older.signature), "counter is bound");
    let mut other_state = parsed;
    other_state.lifecycle = Lifecycle::Installed as u8;
    assert!(!verify_digest(&card_key, &other_state.digest(&challenge), &other_state.signature), "lifecycle is bound");
}

#[test]
fn signatures_are_rfc6979_low_s_and_high_s_is_rejected() {
    let digest = bytes::<32>(ATTEST_KEYED_DIGEST);
    let low = bytes::<64>(ATTEST_KEYED_SIGNATURE);
    assert_eq!(sign_digest(&key(&CARD_SECRET), &digest), low, "deterministic");
    let mut high = low;
    high[32..].copy_from_slice(&negate_mod_n(&low[32..]));
    pin!(ATTEST_KEYED_SIGNATURE_HIGH_S, high);
    let high_sig = Signature::from_slice(&high).expect("a well-formed r||s");
    assert_eq!(high_sig.normalize_s().to_bytes().as_slice(), low.as_slice(), "same signature, other S");
    let card_key: VerifyingKey = *key(&CARD_SECRET).verifying_key();
    assert!(verify_digest(&card_key, &digest, &low));
    assert!(!verify_digest(&card_key, &digest, &high), "hosts reject high-S");
    assert!(!verify_digest(&card_key, &digest, &low[..63]), "64 bytes exactly");
}

#[test]
fn wallet_key_proof() {
    let id = card_id();
    let wallet = wallet_public();
    let preimage = framed(domain::WALLET_KEY, &[id.as_bytes(), &wallet]);
    pin!(WALLET_KEY_PREIMAGE, &preimage);
    let digest = wallet_key_digest(&id, &wallet);
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&preimage)));
    pin!(WALLET_KEY_DIGEST, digest);
    let signature = sign_digest(&key(&CARD_SECRET), &digest);
    pin!(WALLET_KEY_SIGNATURE, signature);
    let proof = WalletKeyProof { public_key: wallet, signature };
    pin!(WALLET_KEY_RESPONSE, proof.encode());
    let parsed = WalletKeyProof::parse(&hex::decode(WALLET_KEY_RESPONSE).expect("hex")).expect("parses");
    let verified = parsed.verify(&id, key(&CARD_SECRET).verifying_key()).expect("proof verifies");
    assert_eq!(public_key_bytes(&verified), wallet);
    assert!(parsed.verify(&CardId([0; 10]), key(&CARD_SECRET).verifying_key()).is_err(), "bound to the card id");
}

#[test]
fn wallet_sign_of_a_host_digest() {
    let digest = bytes::<32>(SIGN_INPUT);
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(b"abc")));
    let signature = sign_digest(&key(&WALLET_SECRET), &digest);
    pin!(SIGN_SIGNATURE, signature);
    assert!(verify_digest(key(&WALLET_SECRET).verifying_key(), &digest, &signature));
    // The card answers the signature as one TLV: 9E 40 r||s.
    pin!(SIGN_RESPONSE, card::tlv::tlv(0x9E, &signature));
}

#[test]
fn self_test_signature_and_kat() {
    let id = card_id();
    let digest = self_test_digest(&id, SELF_TEST_VECTOR);
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(framed(domain::SELF_TEST, &[id.as_bytes(), SELF_TEST_VECTOR]))));
    pin!(SELF_TEST_DIGEST, digest);
    let signature = sign_digest(&key(&CARD_SECRET), &digest);
    pin!(SELF_TEST_SIGNATURE, signature);
    pin!(SELF_TEST_RESPONSE, card::tlv::tlv(0x9E, &signature));
    pin!(KAT_RESPONSE_ALL, card::tlv::tlv(0x86, &[self_test::KAT_ALL]));
    pin!(KAT_RESPONSE_STUCK_RNG, card::tlv::tlv(0x86, &[self_test::KAT_ALL & !self_test::KAT_RNG]));
    assert_eq!(
        self_test::KAT_ALL,
        self_test::KAT_SHA256 | self_test::KAT_AES | self_test::KAT_ECDSA | self_test::KAT_ECDH | self_test::KAT_RNG
    );
}

/// The objects of a TLV sequence, each encoded again on its own.
fn objects(data: &[u8]) -> Vec<Vec<u8>> {
    card::tlv::parse_all(data).expect("TLV").iter().map(|o| card::tlv::tlv(o.tag, o.value)).collect()
}

fn refused_as_non_canonical<T: std::fmt::Debug>(parsed: Result<T, card::CardError>, what: &str) {
    let err = parsed.expect_err(what);
    assert!(err.to_string().contains("not in canonical encoding"), "{what}: {err}");
}

#[test]
fn only_the_canonical_encoding_parses() {
    // Certificate: the same seven fields in any other encoding are refused.
    let cert = hex::decode(CERT).expect("hex");
    let (outer, _) = card::tlv::parse_one(&cert).expect("7F21");
    let fields = objects(outer.value);
    let wrap = |fields: &[Vec<u8>]| card::tlv::tlv(0x7F21, &fields.concat());
    assert_eq!((fields.len(), wrap(&fields)), (7, cert.clone()), "the fields in order give the vector");
    let mut reordered = fields.clone();
    reordered.swap(0, 1);
    refused_as_non_canonical(Certificate::parse(&wrap(&reordered)), "issuer before version");
    let mut duplicated = fields.clone();
    duplicated.insert(1, fields[0].clone());
    refused_as_non_canonical(Certificate::parse(&wrap(&duplicated)), "version twice");
    let mut unknown = fields.clone();
    unknown.insert(6, card::tlv::tlv(0x5F4C, &[0x00]));
    refused_as_non_canonical(Certificate::parse(&wrap(&unknown)), "unknown tag");
    let mut long_length = fields.clone();
    long_length[1] = [&[0x42, 0x81, 0x08][..], &fields[1][2..]].concat();
    refused_as_non_canonical(Certificate::parse(&wrap(&long_length)), "issuer length 81 08");
    let long_outer = [&[0x7F, 0x21, 0x82, 0x00, 0x9A][..], &cert[4..]].concat();
    refused_as_non_canonical(Certificate::parse(&long_outer), "outer length 82 009A");
    let point = bytes::<33>(CARD_PUBLIC);
    let mut key_extra = fields.clone();
    key_extra[3] = card::tlv::tlv(0x7F49, &[card::tlv::tlv(0x86, &point), card::tlv::tlv(0x87, &[0x00])].concat());
    refused_as_non_canonical(Certificate::parse(&wrap(&key_extra)), "extra object in 7F49");
    // The point directly in 7F49 (no 86 inside) is not a certificate at all.
    let mut raw_point = fields.clone();
    raw_point[3] = card::tlv::tlv(0x7F49, &point);
    assert!(Certificate::parse(&wrap(&raw_point)).is_err(), "raw point in 7F49");

    // ATTEST responses: an extra trailing object, or another order.
    let att = hex::decode(ATTEST_INSTALLED_RESPONSE).expect("hex");
    refused_as_non_canonical(Attestation::parse(&[att.clone(), card::tlv::tlv(0x85, &[0x01])].concat()), "trailing 85");
    let mut swapped = objects(&att);
    swapped.swap(0, 1);
    refused_as_non_canonical(Attestation::parse(&swapped.concat()), "counter before card id");
    let mut keyed = objects(&hex::decode(ATTEST_KEYED_RESPONSE).expect("hex"));
    keyed.swap(4, 5);
    refused_as_non_canonical(Attestation::parse(&keyed.concat()), "signature before wallet key");

    // Wallet key proof: 9E before 84, or an extra object.
    let mut proof = objects(&hex::decode(WALLET_KEY_RESPONSE).expect("hex"));
    proof.push(card::tlv::tlv(0x85, &[0x01]));
    refused_as_non_canonical(WalletKeyProof::parse(&proof.concat()), "trailing 85");
    proof.pop();
    proof.reverse();
    refused_as_non_canonical(WalletKeyProof::parse(&proof.concat()), "signature before key");
}

#[test]
fn memory_pattern_vector() {
    let pattern = memory_pattern(&MEMORY_SEED, usize::from(MEMORY_LEN));
    assert_eq!(pattern.len(), usize::from(MEMORY_LEN));
    pin!(MEMORY_PATTERN_FIRST_32, &pattern[..32]);
    // Block i is message_digest(memory-pattern, [seed, i as u32 big-endian]).
    for (i, block) in pattern.chunks(32).enumerate() {
        let counter = u32::try_from(i).expect("few blocks").to_be_bytes();
        let full = message_digest(domain::MEMORY_PATTERN, &[&MEMORY_SEED, &counter]);
        assert_eq!(block, &full[..block.len()], "block {i}");
    }
    // The card answers 87 20 || SHA-256 of what it read back.
    let read_back: [u8; 32] = Sha256::digest(&pattern).into();
    pin!(MEMORY_RESPONSE, card::tlv::tlv(0x87, &read_back));
    assert_eq!(memory_pattern(&MEMORY_SEED, 32)[..], pattern[..32], "a prefix of a longer pattern");
}

/// A transport that records what the host sends and answers from a script.
struct Scripted {
    atr: Atr,
    answers: Vec<Vec<u8>>,
    sent: Vec<Vec<u8>>,
}

impl Transport for Scripted {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent.push(apdu.to_vec());
        assert!(!self.answers.is_empty(), "the host sent more commands than scripted");
        Ok(self.answers.remove(0))
    }

    fn atr(&self) -> &Atr {
        &self.atr
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}

fn ok(hex_data: &str) -> Vec<u8> {
    Response::ok(hex::decode(hex_data).expect("hex")).to_bytes()
}

#[test]
fn command_apdus_of_the_host_client() {
    let challenge = bytes::<32>(CHALLENGE);
    let mut t = Scripted {
        atr: Atr::default(),
        answers: vec![
            ok(SELECT_RESPONSE_KEYED),
            ok(CERT),
            ok(ATTEST_KEYED_RESPONSE),
            ok(WALLET_KEY_RESPONSE),
            ok(WALLET_KEY_RESPONSE),
            ok(SIGN_RESPONSE),
            ok(KAT_RESPONSE_ALL),
            ok(SELF_TEST_RESPONSE),
            ok(MEMORY_RESPONSE),
            ok("00112233445566778899aabbccddeeff"),
        ],
        sent: Vec::new(),
    };
    {
        let mut w = WalletClient::new(&mut t);
        let info = w.select().expect("select");
        assert_eq!((info.protocol_version, info.lifecycle), (1, Lifecycle::Keyed));
        assert_eq!(w.identity().expect("identity"), certificate());
        assert_eq!(w.attest(&challenge).expect("attest").counter, COUNTER_KEYED);
        assert_eq!(w.generate_wallet_key().expect("generate").public_key, wallet_public());
        assert!(w.wallet_key().expect("get wallet key").is_some());
        assert_eq!(hex::encode(w.sign(&bytes(SIGN_INPUT)).expect("sign")), SIGN_SIGNATURE);
        assert_eq!(w.self_test_kat().expect("kat"), self_test::KAT_ALL);
        assert_eq!(hex::encode(w.self_test_sign(SELF_TEST_VECTOR).expect("sign vector")), SELF_TEST_SIGNATURE);
        assert_eq!(hex::encode(w.self_test_memory(&MEMORY_SEED, MEMORY_LEN).expect("memory")), &MEMORY_RESPONSE[4..]);
        assert_eq!(w.get_challenge(CHALLENGE_LEN).expect("challenge").len(), CHALLENGE_LEN);
    }
    let sent: Vec<String> = t.sent.iter().map(hex::encode).collect();
    let expected = [
        APDU_SELECT,
        APDU_GET_IDENTITY,
        APDU_ATTEST,
        APDU_GENERATE_WALLET_KEY,
        APDU_GET_WALLET_KEY,
        APDU_SIGN,
        APDU_SELF_TEST_KAT,
        APDU_SELF_TEST_SIGN,
        APDU_SELF_TEST_MEMORY,
        APDU_GET_CHALLENGE,
    ];
    assert_eq!(sent.len(), expected.len());
    for (got, want) in sent.iter().zip(expected) {
        assert_eq!(got, want);
    }
    pin!(
        SELECT_RESPONSE_KEYED,
        [card::tlv::tlv(0x85, &[1]), card::tlv::tlv(0x82, &[0x03]), card::tlv::tlv(0x8A, &[0x01])].concat()
    );
    pin!(
        APDU_SELECT,
        Command::new(0x00, 0xA4, 0x04, 0x00).with_data(APPLET_AID).with_le(256).to_bytes().expect("apdu")
    );
    pin!(APDU_GET_DATA_IDENTITY, card::gp::get_data(0x7F21).to_bytes().expect("apdu"));
    pin!(APDU_GET_DATA_CPLC, card::gp::get_data(0x9F7F).to_bytes().expect("apdu"));
}

// ---------------------------------------------------------------------------
// The card model against the command tables.

fn transmit(t: &mut dyn Transport, cla: u8, ins: u8, p1: u8, data: &[u8]) -> Response {
    let mut cmd = Command::new(cla, ins, p1, 0x00).with_le(256);
    if !data.is_empty() {
        cmd = cmd.with_data(data.to_vec());
    }
    t.transmit(&cmd).expect("the emulated card answers")
}

fn install_wallet(t: &mut dyn Transport, cap: &CapFile) {
    let ring = KeyRing::new().with(0xFF, KeySource::Static(StaticKeys::gp_default()));
    let mut gp = GpSession::open(t, &ring, 0, SecurityLevel::CMac).expect("GP session with the default keys");
    if gp.get_status(card::gp::StatusScope::LoadFiles).is_ok_and(|l| l.iter().any(|p| p.aid == PACKAGE_AID)) {
        gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0x00, &[]).expect("install");
        return;
    }
    gp.load(&PACKAGE_AID, &cap.load_file_sha256(false), &cap.load_file_data_block(false), 240, &mut |_, _| {})
        .expect("load");
    gp.install_for_install(&PACKAGE_AID, &APPLET_AID, &APPLET_AID, 0x00, &[]).expect("install");
}

#[test]
fn the_card_model_follows_the_command_tables() {
    let cap_zip = CapBuilder::new(&PACKAGE_AID, "tapline/wallet").applet(&APPLET_AID).build().expect("cap builds");
    let cap = CapFile::from_bytes(&cap_zip).expect("cap parses");
    let bank = EmuBank::new(1, 0.0, Duration::from_millis(10));
    let chip = ChipFactory::new(11).make(ChipKind::Genuine, CardFaults::default());
    bank.slots()[0].insert(chip).expect("slot is empty");
    let mut reader = bank.reader(0).expect("reader 0");
    let mut t = reader.connect().expect("card present");
    let t: &mut dyn Transport = &mut *t;

    // Identity from the card manager before any applet exists. The ISD is
    // the default selected application at power-up: no SELECT needed.
    let cplc = card::gp::session::read_cplc(t).expect("CPLC without SELECT");
    let cert_bytes = card::gp::session::read_identity(t).expect("GET DATA 7F21").expect("offered");
    let card_data = t.transmit(&card::gp::get_data(0x0066)).expect("answer");
    assert_eq!((card_data.sw, card_data.data.first()), (StatusWord::OK, Some(&0x66)), "GET DATA 66 without SELECT");
    // A wallet command that reaches the card manager is not the applet's.
    assert_eq!(transmit(t, 0x80, 0x10, 0, &[]).sw, StatusWord::SECURITY_STATUS);
    // After a failed SELECT nothing is selected, until a SELECT succeeds.
    assert_eq!(transmit(t, 0x00, 0xA4, 0x04, &[0xF0, 0x00, 0x00, 0x00, 0x01]).sw, StatusWord::FILE_NOT_FOUND);
    assert_eq!(t.transmit(&card::gp::get_data(0x9F7F)).expect("answer").sw, StatusWord::CONDITIONS_NOT_SATISFIED);
    card::gp::session::select_isd(t).expect("SELECT ISD");
    assert_eq!(card::gp::session::read_cplc(t).expect("CPLC after SELECT ISD"), cplc);
    let cert = Certificate::parse(&cert_bytes).expect("certificate parses");
    assert_eq!(cert.subject, cplc.card_id());
    let (card_key, _) = cert.verify(&[demo_vendor_ca_public()], NOT_BEFORE + 1).expect("chains to the demo CA");

    install_wallet(t, &cap);
    let sel = transmit(t, 0x00, 0xA4, 0x04, &APPLET_AID);
    assert_eq!((sel.sw, hex::encode(&sel.data).as_str()), (StatusWord::OK, "8501018201018a0100"));
    assert_eq!(transmit(t, 0x80, 0x10, 0, &[]).data, cert_bytes, "GET IDENTITY = GET DATA 7F21");

    // ATTEST: 32-byte challenge only; a refused ATTEST does not move the counter.
    let challenge = bytes::<32>(CHALLENGE);
    assert_eq!(transmit(t, 0x80, 0x12, 0, &challenge[..31]).sw, StatusWord::WRONG_LENGTH);
    let r = transmit(t, 0x80, 0x12, 0, &challenge);
    let att = Attestation::parse(&r.data).expect("attestation parses");
    assert_eq!((att.counter, att.lifecycle, att.wallet_key), (1, 0x01, None));
    assert_eq!(att.card_id, cplc.card_id());
    assert_eq!(att.firmware_hash, cap.load_file_sha256(false), "hash of the raw load file, without C4");
    assert!(verify_digest(&card_key, &att.digest(&challenge), &att.signature));

    // Installed: no wallet key yet.
    assert_eq!(transmit(t, 0x80, 0x22, 0, &[]).sw, StatusWord::REFERENCED_DATA_NOT_FOUND);
    // Backup linking in Installed (section 8.1): only LINK BACKUP and ABORT.
    let nope = StatusWord::CONDITIONS_NOT_SATISFIED;
    assert_eq!(transmit(t, 0x80, 0x24, 0, &[0; 17]).sw, nope, "LINK PRIMARY");
    assert_eq!(transmit(t, 0x80, 0x24, 0, &[0; 16]).sw, StatusWord::WRONG_LENGTH, "LINK PRIMARY length");
    assert_eq!(transmit(t, 0x80, 0x26, 0, &[0; 20]).sw, nope, "ADD BACKUP");
    assert_eq!(transmit(t, 0x80, 0x27, 0, &[0; 10]).sw, nope, "EXPORT");
    assert_eq!(transmit(t, 0x80, 0x28, 0, &[0; 20]).sw, nope, "IMPORT");
    assert_eq!(transmit(t, 0x80, 0x29, 0, &[0; 20]).sw, nope, "CONFIRM BACKUP");
    assert_eq!(transmit(t, 0x80, 0x2A, 0, &[0; 32]).sw, nope, "PROVE WALLET");
    assert_eq!(transmit(t, 0x80, 0x2B, 0, &[]).sw, nope, "FINALIZE");
    assert_eq!(transmit(t, 0x80, 0x2C, 0, &[]).sw, StatusWord::OK, "ABORT BUNDLE");
    assert_eq!(transmit(t, 0x80, 0x2D, 0, b"246810").sw, nope, "SET ACCESS CODE");
    let verify = Command::new(0x00, 0x20, 0x00, 0x81).with_data(b"246810".to_vec());
    assert_eq!(t.transmit(&verify).expect("answer").sw, nope, "VERIFY");
    assert_eq!(hex::encode(transmit(t, 0x00, 0xA4, 0x04, &APPLET_AID).data), "8501018201018a0100");
    assert_eq!(transmit(t, 0x80, 0x30, 0, &[0; 32]).sw, StatusWord::CONDITIONS_NOT_SATISFIED);
    assert_eq!(transmit(t, 0x80, 0x30, 0, &[0; 31]).sw, StatusWord::WRONG_LENGTH);

    // GENERATE WALLET KEY: Installed -> Keyed, once.
    let r = transmit(t, 0x80, 0x20, 0, &[]);
    let proof = WalletKeyProof::parse(&r.data).expect("proof parses");
    let wallet = proof.verify(&cert.subject, &card_key).expect("proof verifies");
    assert_eq!(transmit(t, 0x80, 0x20, 0, &[]).sw, StatusWord::CONDITIONS_NOT_SATISFIED);
    assert_eq!(hex::encode(transmit(t, 0x00, 0xA4, 0x04, &APPLET_AID).data), "8501018201038a0101");
    assert_eq!(
        WalletKeyProof::parse(&transmit(t, 0x80, 0x22, 0, &[]).data).expect("proof").public_key,
        proof.public_key
    );
    let r = transmit(t, 0x80, 0x30, 0, &bytes::<32>(SIGN_INPUT));
    assert_eq!((r.sw, r.data.len(), &r.data[..2]), (StatusWord::OK, 66, &[0x9E, 0x40][..]), "SIGN answers 9E 40 r||s");
    assert!(verify_digest(&wallet, &bytes(SIGN_INPUT), &r.data[2..]));
    let att = Attestation::parse(&transmit(t, 0x80, 0x12, 0, &challenge).data).expect("attestation");
    assert_eq!((att.counter, att.lifecycle, att.wallet_key), (2, 0x03, Some(proof.public_key)));

    // SELF TEST.
    assert_eq!(hex::encode(transmit(t, 0x80, 0x40, 0x01, &[]).data), KAT_RESPONSE_ALL);
    assert_eq!(transmit(t, 0x80, 0x40, 0x02, &[]).sw, StatusWord::WRONG_LENGTH);
    assert_eq!(transmit(t, 0x80, 0x40, 0x02, &[0x55; 129]).sw, StatusWord::WRONG_LENGTH);
    assert_eq!(transmit(t, 0x80, 0x40, 0x02, &[0x55; 128]).sw, StatusWord::OK);
    let r = transmit(t, 0x80, 0x40, 0x02, &[0x55]);
    let sig = card::tlv::require_array::<64>(&card::tlv::parse_all(&r.data).expect("tlv"), 0x9E).expect("9E");
    assert!(verify_digest(&card_key, &self_test_digest(&cert.subject, &[0x55]), &sig));
    let memory = |seed: [u8; 4], len: u16| {
        let mut body = seed.to_vec();
        body.extend_from_slice(&len.to_be_bytes());
        body
    };
    assert_eq!(
        transmit(t, 0x80, 0x40, 0x03, &memory(MEMORY_SEED, MEMORY_LEN)).data,
        hex::decode(MEMORY_RESPONSE).expect("hex")
    );
    assert_eq!(transmit(t, 0x80, 0x40, 0x03, &memory(MEMORY_SEED, MEMORY_LEN)[..5]).sw, StatusWord::WRONG_LENGTH);
    assert_eq!(transmit(t, 0x80, 0x40, 0x03, &memory(MEMORY_SEED, 0)).sw, StatusWord::WRONG_DATA);
    assert_eq!(transmit(t, 0x80, 0x40, 0x03, &memory(MEMORY_SEED, 4097)).sw, StatusWord::WRONG_DATA);
    assert_eq!(transmit(t, 0x80, 0x40, 0x03, &memory(MEMORY_SEED, 4096)).sw, StatusWord::OK);
    assert_eq!(transmit(t, 0x80, 0x40, 0x04, &[]).sw, StatusWord::INCORRECT_P1P2);

    // GET CHALLENGE, class and instruction errors, reserved range.
    let r = t.transmit(&Command::new(0x00, 0x84, 0, 0).with_le(CHALLENGE_LEN)).expect("answer");
    assert_eq!((r.sw, r.data.len()), (StatusWord::OK, CHALLENGE_LEN));
    assert_eq!(transmit(t, 0x00, 0x10, 0, &[]).sw, StatusWord::CLA_NOT_SUPPORTED);
    assert_eq!(transmit(t, 0x84, 0x10, 0, &[]).sw, StatusWord::CLA_NOT_SUPPORTED);
    assert_eq!(transmit(t, 0x80, 0x84, 0, &[]).sw, StatusWord::INS_NOT_SUPPORTED);
    for ins in 0x2E..=0x2F {
        assert_eq!(transmit(t, 0x80, ins, 0, &[]).sw, StatusWord::INS_NOT_SUPPORTED, "reserved INS {ins:02X}");
    }

    // Rework of a Keyed (not Sealed) card: delete the instance and install
    // again. The wallet key is gone, the lifecycle is back to Installed, the
    // counter carries on. (The refusal to DELETE a Sealed wallet is not
    // tested here: version 1 has no command that seals a card.)
    {
        let ring = KeyRing::new().with(0xFF, KeySource::Static(StaticKeys::gp_default()));
        let mut gp = GpSession::open(t, &ring, 0, SecurityLevel::CMac).expect("GP session");
        assert!(gp.delete(&APPLET_AID, false).expect("delete instance"));
    }
    assert_eq!(transmit(t, 0x00, 0xA4, 0x04, &APPLET_AID).sw, StatusWord::FILE_NOT_FOUND);
    install_wallet(t, &cap);
    assert_eq!(hex::encode(transmit(t, 0x00, 0xA4, 0x04, &APPLET_AID).data), "8501018201018a0100");
    let att = Attestation::parse(&transmit(t, 0x80, 0x12, 0, &challenge).data).expect("attestation");
    assert_eq!((att.counter, att.lifecycle, att.wallet_key), (3, 0x01, None));
}

#[test]
fn kat_clears_the_rng_bit_when_the_rng_is_stuck() {
    let cap_zip = CapBuilder::new(&PACKAGE_AID, "tapline/wallet").applet(&APPLET_AID).build().expect("cap builds");
    let cap = CapFile::from_bytes(&cap_zip).expect("cap parses");
    let bank = EmuBank::new(1, 0.0, Duration::from_millis(10));
    let chip = ChipFactory::new(12).make(ChipKind::Genuine, CardFaults { stuck_rng: true, ..CardFaults::default() });
    bank.slots()[0].insert(chip).expect("slot is empty");
    let mut reader = bank.reader(0).expect("reader 0");
    let mut t = reader.connect().expect("card present");
    let t: &mut dyn Transport = &mut *t;
    install_wallet(t, &cap);
    assert_eq!(transmit(t, 0x00, 0xA4, 0x04, &APPLET_AID).sw, StatusWord::OK);
    let r = transmit(t, 0x80, 0x40, 0x01, &[]);
    assert_eq!((r.sw, hex::encode(&r.data).as_str()), (StatusWord::OK, KAT_RESPONSE_STUCK_RNG));
}

/// The latency classes of section 9.1, in milliseconds, for both models.
#[test]
fn latency_classes_of_the_document() {
    use card::emu::latency::{Cost, LatencyModel};
    let ms = |model: &LatencyModel, cost: Cost| (model.duration(cost).as_secs_f64() * 1000.0).round();
    for (model, want) in [
        (LatencyModel::JCOP4, [12.0, 44.0, 72.0, 162.0, 72.0, 76.0, 92.0, 96.0]),
        (LatencyModel::SLOW, [18.0, 74.0, 224.0, 318.0, 118.0, 130.0, 264.0, 170.0]),
    ] {
        let got = [
            Cost::Small,
            Cost::Sign(1),
            Cost::KeyGen,
            Cost::SelfTestKat,
            Cost::MemoryTest,
            Cost::Sign(2),
            Cost::Export,
            Cost::Import,
        ]
        .map(|c| ms(&model, c));
        assert_eq!(got, want, "small, sign, keygen, KAT, memory, sign x2, export, import");
    }
}

// ---------------------------------------------------------------------------
// Backup linking (section 16).

fn backup_id() -> CardId {
    CardId(bytes(BACKUP_CARD_ID))
}

fn bundle_id() -> [u8; 16] {
    bytes(BUNDLE_ID)
}

fn backup_certificate() -> Certificate {
    Certificate::issue(&key(&CA_SECRET), backup_id(), key(&BACKUP_SECRET).verifying_key(), NOT_BEFORE, NOT_AFTER)
}

fn route() -> TransferRoute {
    TransferRoute { bundle_id: bundle_id(), from: card_id(), to: backup_id() }
}

/// The vector transfer blob, from the pure card-side function with the
/// fixed ephemeral key and GCM nonce.
fn transfer_blob() -> TransferBlob {
    bundle::seal_transfer(
        &route(),
        &key(&WALLET_SECRET),
        key(&BACKUP_SECRET).verifying_key(),
        &key(&CARD_SECRET),
        &key(&EPHEMERAL_SECRET),
        &bytes(GCM_NONCE),
    )
}

#[test]
fn backup_linking_keys_labels_and_certificate() {
    pin!(BACKUP_CARD_PUBLIC, public_key_bytes(key(&BACKUP_SECRET).verifying_key()));
    pin!(EPHEMERAL_PUBLIC, public_key_bytes(key(&EPHEMERAL_SECRET).verifying_key()));
    pin!(BACKUP_CERT, backup_certificate().encode());
    pin!(EMPTY_DIGEST_LINK, message_digest(domain::LINK, &[]));
    pin!(EMPTY_DIGEST_TRANSFER, message_digest(domain::TRANSFER, &[]));
    pin!(EMPTY_DIGEST_CONFIRM, message_digest(domain::CONFIRM, &[]));
    pin!(EMPTY_DIGEST_WALLET_PROOF, message_digest(domain::WALLET_PROOF, &[]));
    pin!(EMPTY_DIGEST_SEALED, message_digest(domain::SEALED, &[]));
    assert_eq!(domain::LINK, b"TAPLINE/link/v1");
    assert_eq!(domain::TRANSFER, b"TAPLINE/transfer/v1");
    assert_eq!(domain::CONFIRM, b"TAPLINE/confirm/v1");
    assert_eq!(domain::WALLET_PROOF, b"TAPLINE/wallet-proof/v1");
    assert_eq!(domain::SEALED, b"TAPLINE/sealed/v1");
    assert_eq!((Role::Primary as u8, Role::Backup as u8), (0x01, 0x02));
    assert_eq!(Lifecycle::Linked as u8, 0x07);
    // Cards check each other without a clock: the untimed check passes an
    // expired certificate but not an unpinned issuer.
    let ca = *key(&CA_SECRET).verifying_key();
    let expired = Certificate::issue(&key(&CA_SECRET), backup_id(), key(&BACKUP_SECRET).verifying_key(), 1, 2);
    assert!(expired.verify(&[ca], NOT_BEFORE).is_err());
    assert!(expired.verify_untimed(&[ca]).is_ok());
    assert!(backup_certificate().verify_untimed(&[*key(&CARD_SECRET).verifying_key()]).is_err());
}

#[test]
fn link_vectors() {
    let nonce = bytes::<32>(LINK_NONCE);
    pin!(LINK_PRIMARY_RESPONSE, card::tlv::tlv(0x8B, &nonce));
    let firmware = bytes::<32>(FIRMWARE_HASH);
    let linked = [Lifecycle::Linked as u8];
    let preimage =
        framed(domain::LINK, &[&bundle_id(), card_id().as_bytes(), &nonce, backup_id().as_bytes(), &firmware, &linked]);
    pin!(LINK_PREIMAGE, &preimage);
    let digest = link_digest(&bundle_id(), &card_id(), &nonce, &backup_id(), &firmware, linked[0]);
    assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&preimage)));
    pin!(LINK_DIGEST, digest);
    let signature = sign_digest(&key(&BACKUP_SECRET), &digest);
    pin!(LINK_SIGNATURE, signature);
    let att = LinkAttestation { card_id: backup_id(), firmware_hash: firmware, signature };
    pin!(LINK_ATTESTATION_RESPONSE, att.encode());
    let parsed = LinkAttestation::parse(&hex::decode(LINK_ATTESTATION_RESPONSE).expect("hex")).expect("parses");
    assert_eq!(parsed, att);
    let backup_key = *key(&BACKUP_SECRET).verifying_key();
    parsed.verify(&backup_key, &bundle_id(), &card_id(), &nonce).expect("verifies");
    // Bound to the bundle, the primary and its nonce.
    assert!(parsed.verify(&backup_key, &[0; 16], &card_id(), &nonce).is_err(), "other bundle");
    assert!(parsed.verify(&backup_key, &bundle_id(), &backup_id(), &nonce).is_err(), "other primary");
    assert!(parsed.verify(&backup_key, &bundle_id(), &card_id(), &[0; 32]).is_err(), "other nonce");
}

#[test]
fn transfer_vectors() {
    use aes_gcm::aead::{AeadInOut, KeyInit, Nonce, Tag};
    let (backup, ephemeral) = (key(&BACKUP_SECRET), key(&EPHEMERAL_SECRET));
    // ECDH: both sides get the same x-coordinate.
    let shared = bundle::ecdh_x(&ephemeral, backup.verifying_key());
    assert_eq!(*shared, *bundle::ecdh_x(&backup, ephemeral.verifying_key()));
    pin!(TRANSFER_SHARED_X, *shared);
    // HKDF-SHA256(salt = bundle id, ikm = x, info = label || primary || backup).
    let info = [domain::TRANSFER, card_id().as_bytes(), backup_id().as_bytes()].concat();
    let mut okm = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(&bundle_id()), &shared[..]).expand(&info, &mut okm).expect("32 bytes");
    let transfer_key = bundle::transfer_key(&route(), &shared);
    assert_eq!(*transfer_key, okm);
    pin!(TRANSFER_KEY, okm);
    let aad = bundle::transfer_aad(&route(), &wallet_public());
    assert_eq!(aad, [&bundle_id()[..], card_id().as_bytes(), backup_id().as_bytes(), &wallet_public()].concat());
    pin!(TRANSFER_AAD, &aad);
    // AES-256-GCM of the wallet secret, written out with the aes-gcm crate.
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&okm).expect("AES-256 key");
    let mut buf = WALLET_SECRET;
    let tag = cipher
        .encrypt_inout_detached(&Nonce::<aes_gcm::Aes256Gcm>::from(bytes::<12>(GCM_NONCE)), &aad, (&mut buf[..]).into())
        .expect("encrypts");
    let ciphertext = [&buf[..], &tag[..]].concat();
    pin!(TRANSFER_CIPHERTEXT, &ciphertext);
    let blob = transfer_blob();
    assert_eq!(blob.ciphertext[..], ciphertext[..]);
    assert_eq!(blob.ephemeral_key, bytes::<33>(EPHEMERAL_PUBLIC));
    let preimage = framed(
        domain::TRANSFER,
        &[
            &bundle_id(),
            card_id().as_bytes(),
            backup_id().as_bytes(),
            &wallet_public(),
            &blob.ephemeral_key,
            &blob.gcm_nonce,
            &blob.ciphertext,
        ],
    );
    pin!(TRANSFER_PREIMAGE, &preimage);
    assert_eq!(blob.digest(), <[u8; 32]>::from(Sha256::digest(&preimage)));
    pin!(TRANSFER_DIGEST, blob.digest());
    assert_eq!(blob.signature, sign_digest(&key(&CARD_SECRET), &blob.digest()));
    pin!(TRANSFER_SIGNATURE, blob.signature);
    pin!(TRANSFER_BLOB, blob.encode());
    assert_eq!(blob.encode().len(), 242);
    // The backup opens the vector blob and gets the wallet secret.
    let parsed = TransferBlob::parse(&hex::decode(TRANSFER_BLOB).expect("hex")).expect("parses");
    assert_eq!(parsed, blob);
    parsed.verify(key(&CARD_SECRET).verifying_key()).expect("the primary signed it");
    let opened = bundle::open_transfer(&parsed, &backup, key(&CARD_SECRET).verifying_key()).expect("opens");
    assert_eq!(<[u8; 32]>::from(opened.to_bytes()), WALLET_SECRET);
    let mut back = [0u8; 32];
    back.copy_from_slice(&ciphertext[..32]);
    cipher
        .decrypt_inout_detached(
            &Nonce::<aes_gcm::Aes256Gcm>::from(bytes::<12>(GCM_NONCE)),
            &aad,
            (&mut back[..]).into(),
            &Tag::<aes_gcm::Aes256Gcm>::try_from(&ciphertext[32..]).expect("16-byte tag"),
        )
        .expect("decrypts");
    assert_eq!(back, WALLET_SECRET);
    // Only the addressed card can open it.
    assert!(bundle::open_transfer(&parsed, &key(&CARD_SECRET), key(&CARD_SECRET).verifying_key()).is_err());
}

#[test]
fn confirmation_wallet_proof_and_seal_vectors() {
    let wallet = wallet_public();
    let digest = confirm_digest(&bundle_id(), &backup_id(), &card_id(), &wallet);
    assert_eq!(
        digest,
        <[u8; 32]>::from(Sha256::digest(framed(
            domain::CONFIRM,
            &[&bundle_id(), backup_id().as_bytes(), card_id().as_bytes(), &wallet]
        )))
    );
    pin!(CONFIRM_DIGEST, digest);
    let signature = sign_digest(&key(&BACKUP_SECRET), &digest);
    pin!(CONFIRM_SIGNATURE, signature);
    let conf = ImportConfirmation { card_id: backup_id(), wallet_key: wallet, signature };
    pin!(CONFIRM_RESPONSE, conf.encode());
    let parsed = ImportConfirmation::parse(&hex::decode(CONFIRM_RESPONSE).expect("hex")).expect("parses");
    parsed.verify(key(&BACKUP_SECRET).verifying_key(), &bundle_id(), &card_id()).expect("verifies");
    assert!(parsed.verify(key(&BACKUP_SECRET).verifying_key(), &bundle_id(), &backup_id()).is_err());

    // PROVE WALLET: the wallet key signs; the backup proves the same key.
    let challenge = bytes::<32>(CHALLENGE);
    let digest = wallet_proof_digest(&challenge, &card_id(), Some(&bundle_id()));
    assert_eq!(
        digest,
        <[u8; 32]>::from(Sha256::digest(framed(
            domain::WALLET_PROOF,
            &[&challenge, card_id().as_bytes(), &bundle_id()]
        )))
    );
    pin!(WALLET_PROOF_DIGEST, digest);
    pin!(WALLET_PROOF_DIGEST_UNBUNDLED, wallet_proof_digest(&challenge, &card_id(), None));
    let signature = sign_digest(&key(&WALLET_SECRET), &digest);
    pin!(WALLET_PROOF_SIGNATURE, signature);
    let proof = WalletProof { wallet_key: wallet, signature };
    pin!(WALLET_PROOF_RESPONSE, proof.encode());
    let parsed = WalletProof::parse(&hex::decode(WALLET_PROOF_RESPONSE).expect("hex")).expect("parses");
    let verified = parsed.verify(&challenge, &card_id(), Some(&bundle_id())).expect("verifies");
    assert_eq!(public_key_bytes(&verified), wallet);
    assert!(parsed.verify(&challenge, &card_id(), None).is_err(), "bound to the bundle");
    assert!(parsed.verify(&challenge, &backup_id(), Some(&bundle_id())).is_err(), "bound to the card");

    // FINALIZE: the card key over bundle, card, role and wallet key.
    let primary = sealed_digest(&bundle_id(), &card_id(), Role::Primary, &wallet);
    assert_eq!(
        primary,
        <[u8; 32]>::from(Sha256::digest(framed(
            domain::SEALED,
            &[&bundle_id(), card_id().as_bytes(), &[0x01], &wallet]
        )))
    );
    pin!(SEALED_DIGEST_PRIMARY, primary);
    let signature = sign_digest(&key(&CARD_SECRET), &primary);
    pin!(SEALED_SIGNATURE_PRIMARY, signature);
    pin!(FINALIZE_RESPONSE_PRIMARY, card::tlv::tlv(0x9E, &signature));
    let backup = sealed_digest(&bundle_id(), &backup_id(), Role::Backup, &wallet);
    pin!(SEALED_DIGEST_BACKUP, backup);
    pin!(SEALED_SIGNATURE_BACKUP, sign_digest(&key(&BACKUP_SECRET), &backup));
}

#[test]
fn backup_linking_encodings_are_canonical_only() {
    let blob = hex::decode(TRANSFER_BLOB).expect("hex");
    refused_as_non_canonical(TransferBlob::parse(&[blob.clone(), card::tlv::tlv(0x85, &[0x01])].concat()), "trailing");
    let mut swapped = objects(&blob);
    assert_eq!(swapped.len(), 8);
    swapped.swap(1, 2);
    refused_as_non_canonical(TransferBlob::parse(&swapped.concat()), "to before from");
    let mut att = objects(&hex::decode(LINK_ATTESTATION_RESPONSE).expect("hex"));
    att.swap(1, 2);
    refused_as_non_canonical(LinkAttestation::parse(&att.concat()), "signature before firmware hash");
    let mut conf = objects(&hex::decode(CONFIRM_RESPONSE).expect("hex"));
    conf.push(card::tlv::tlv(0x85, &[0x01]));
    refused_as_non_canonical(ImportConfirmation::parse(&conf.concat()), "trailing 85");
    let mut proof = objects(&hex::decode(WALLET_PROOF_RESPONSE).expect("hex"));
    proof.reverse();
    refused_as_non_canonical(WalletProof::parse(&proof.concat()), "signature before key");
}

#[test]
fn backup_linking_command_apdus_of_the_host_client() {
    let nonce = bytes::<32>(LINK_NONCE);
    let select_backup = [
        card::tlv::tlv(0x85, &[1]),
        card::tlv::tlv(0x82, &[Lifecycle::Linked as u8]),
        card::tlv::tlv(0x8A, &[0x00]),
        card::tlv::tlv(0x88, &[Role::Backup as u8]),
        card::tlv::tlv(0x89, &bundle_id()),
    ]
    .concat();
    pin!(SELECT_RESPONSE_LINKED_BACKUP, &select_backup);
    let mut t = Scripted {
        atr: Atr::default(),
        answers: vec![
            ok(SELECT_RESPONSE_LINKED_BACKUP),
            ok(LINK_PRIMARY_RESPONSE),
            ok(LINK_ATTESTATION_RESPONSE),
            ok(""),
            ok(""),
            ok(TRANSFER_BLOB),
            ok(CONFIRM_RESPONSE),
            ok(""),
            ok(WALLET_PROOF_RESPONSE),
            ok(FINALIZE_RESPONSE_PRIMARY),
            ok(""),
            ok(""),
            ok(""),
        ],
        sent: Vec::new(),
    };
    {
        let mut w = WalletClient::new(&mut t);
        let info = w.select().expect("select");
        assert_eq!(
            (info.lifecycle, info.role, info.bundle_id, info.has_wallet_key),
            (Lifecycle::Linked, Some(Role::Backup), Some(bundle_id()), false)
        );
        assert_eq!(w.link_primary(&bundle_id(), BACKUPS_ANNOUNCED).expect("link primary"), nonce);
        let att = w.link_backup(&bundle_id(), &hex::decode(CERT).expect("hex"), &nonce).expect("link backup");
        w.add_backup(&backup_certificate().encode(), &att).expect("add backup");
        assert_eq!(hex::encode(w.export_to(&backup_id()).expect("export")), TRANSFER_BLOB);
        let conf = w.import(&hex::decode(TRANSFER_BLOB).expect("hex")).expect("import");
        w.confirm_backup(&conf).expect("confirm");
        assert_eq!(w.prove_wallet(&bytes(CHALLENGE)).expect("prove").wallet_key, wallet_public());
        assert_eq!(hex::encode(w.finalize().expect("finalize")), SEALED_SIGNATURE_PRIMARY);
        w.abort_bundle().expect("abort");
        w.set_access_code(&hex::decode(ACCESS_CODE).expect("hex")).expect("set");
        w.verify_access_code(&hex::decode(ACCESS_CODE).expect("hex")).expect("verify");
    }
    let sent: Vec<String> = t.sent.iter().map(hex::encode).collect();
    let expected = [
        APDU_SELECT,
        APDU_LINK_PRIMARY,
        APDU_LINK_BACKUP,
        APDU_ADD_BACKUP_1,
        APDU_ADD_BACKUP_2,
        APDU_EXPORT,
        APDU_IMPORT,
        APDU_CONFIRM_BACKUP,
        APDU_PROVE_WALLET,
        APDU_FINALIZE,
        APDU_ABORT_BUNDLE,
        APDU_SET_ACCESS_CODE,
        APDU_VERIFY_ACCESS_CODE,
    ];
    let names = [
        "APDU_SELECT",
        "APDU_LINK_PRIMARY",
        "APDU_LINK_BACKUP",
        "APDU_ADD_BACKUP_1",
        "APDU_ADD_BACKUP_2",
        "APDU_EXPORT",
        "APDU_IMPORT",
        "APDU_CONFIRM_BACKUP",
        "APDU_PROVE_WALLET",
        "APDU_FINALIZE",
        "APDU_ABORT_BUNDLE",
        "APDU_SET_ACCESS_CODE",
        "APDU_VERIFY_ACCESS_CODE",
    ];
    assert_eq!(sent.len(), expected.len());
    for ((got, want), name) in sent.iter().zip(expected).zip(names) {
        assert_eq!(got, want, "{name}");
    }
    // ADD BACKUP is chained: CLA 90 then CLA 80, each a short APDU.
    assert_eq!((&APDU_ADD_BACKUP_1[..2], &APDU_ADD_BACKUP_2[..2]), ("90", "80"));
    assert!(t.sent.iter().all(|a| Command::parse(a).is_ok_and(|c| !c.is_extended())), "short APDUs only");
}

// ---------------------------------------------------------------------------
// The document and this file agree.

#[test]
fn the_document_carries_every_vector() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/card-protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/card-protocol.md is readable");
    // Long values are wrapped in the document: compare without whitespace.
    let flat: String = doc.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    let missing: Vec<&str> = ALL_HEX
        .iter()
        .filter(|(_, hex_text)| hex_text.is_empty() || !flat.contains(&hex_text.to_ascii_lowercase()))
        .map(|(name, _)| *name)
        .collect();
    assert!(missing.is_empty(), "docs/card-protocol.md lacks the vectors {missing:?}");
    for (name, hex_text) in ALL_HEX {
        assert!(hex::decode(hex_text).is_ok(), "{name} is not hex");
    }
}
