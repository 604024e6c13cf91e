//! Control messages of arbitrary bytes, both ways: client requests as kmd-shim decodes
//! them, replies as the runtime decodes them, and kmd ↔ firmware messages. Nothing panics,
//! and whatever decodes encodes back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use userq_uapi::fwmsg::{FwEvent, FwRequest};
use userq_uapi::ioctl::{
    BufferReply, CreateFenceReply, CreateQueueReply, EmptyReply, ImportFenceReply,
    OpenContextReply, RawReply, Reply, Request, ResetStatsReply,
};

fn words(data: &[u8]) -> [u64; 8] {
    let mut w = [0u64; 8];
    for (i, x) in w.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        for (j, byte) in b.iter_mut().enumerate() {
            *byte = data.get(i * 8 + j).copied().unwrap_or(0);
        }
        *x = u64::from_le_bytes(b);
    }
    w
}

fn reply<R: Reply + PartialEq + std::fmt::Debug>(values: &[u64; 7]) {
    if let Ok(r) = R::decode(values) {
        assert_eq!(R::decode(&r.encode()), Ok(r));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode(data) {
        assert_eq!(Request::decode(bytemuck::bytes_of(&req.encode())), Ok(req));
    }
    if let Ok(raw) = RawReply::decode(data) {
        reply::<OpenContextReply>(&raw.values);
        reply::<CreateQueueReply>(&raw.values);
        reply::<CreateFenceReply>(&raw.values);
        reply::<ImportFenceReply>(&raw.values);
        reply::<BufferReply>(&raw.values);
        reply::<EmptyReply>(&raw.values);
        reply::<ResetStatsReply>(&raw.values);
    }
    let w = words(data);
    if let Ok((seq, req)) = FwRequest::decode(&w) {
        assert_eq!(FwRequest::decode(&req.encode(seq)), Ok((seq, req)));
    }
    if let Some(ev) = FwEvent::decode(&w) {
        assert_eq!(FwEvent::decode(&ev.encode()), Some(ev));
    }
});
