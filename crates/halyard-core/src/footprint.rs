//! What a held message really costs in memory, for the memory meter (issue 14): the meter
//! counted only topic and payload once, and the broker's resident set grew to about 1.4 times
//! what it showed. The figures come from the types themselves (`size_of`) and from how the
//! allocator and the read buffers hand out memory, so they follow the code when it changes.

use halyard_codec::Properties;

use crate::message::Message;

/// Bytes the allocator gives for a request of `bytes`: its size classes are spaced by a
/// quarter of the power of two below the size (8-byte steps up to 64 bytes), as with
/// mimalloc, the binary's allocator; a request of 0 allocates nothing.
pub(crate) fn allocated(bytes: usize) -> usize {
    const WORD: usize = 8;
    if bytes <= 8 * WORD {
        return bytes.next_multiple_of(WORD);
    }
    let step = (1usize << bytes.ilog2()) / 4;
    bytes.next_multiple_of(step)
}

/// Wire bytes of a QoS 1/2 PUBLISH besides its topic and payload, at most: fixed header
/// (up to 5), topic length (2), packet id (2), property length (up to 4).
const PUBLISH_FRAMING: usize = 13;

/// A payload decoded from a connection is a slice of the 4 KiB read buffer the packet
/// arrived in, and keeps that buffer alive: the message holds its share of the buffer, topic
/// and framing included. Each buffer is allocated for 4 KiB plus the partial packet carried
/// over, which the allocator serves from its 5 KiB class: the share is a quarter more than
/// the packet's bytes.
fn read_buffer_share(packet_bytes: usize) -> usize {
    packet_bytes + packet_bytes / 4
}

/// Bytes one message holds on the heap: its shared allocation (the two `Arc` counters and
/// the [`Message`]), the topic's own copy, its payload with the read buffer around it, and its
/// forwarded properties.
pub(crate) fn message_footprint(message: &Message) -> usize {
    let shared = allocated(size_of::<usize>() * 2 + size_of::<Message>());
    let wire = message.topic.len() + message.payload.len() + PUBLISH_FRAMING;
    shared
        + allocated(message.topic.capacity())
        + read_buffer_share(wire)
        + message
            .properties
            .as_deref()
            .map_or(0, properties_footprint)
}

/// Bytes of a boxed [`Properties`] and what its fields own, for the properties a message
/// forwards (payload format, content type, response topic, correlation data, user
/// properties).
fn properties_footprint(properties: &Properties) -> usize {
    let text = |text: &Option<String>| text.as_ref().map_or(0, |s| allocated(s.capacity()));
    allocated(size_of::<Properties>())
        + text(&properties.content_type)
        + text(&properties.response_topic)
        + properties
            .correlation_data
            .as_ref()
            .map_or(0, |data| allocated(data.len()))
        + allocated(properties.user_properties.capacity() * size_of::<(String, String)>())
        + properties
            .user_properties
            .iter()
            .map(|(key, value)| allocated(key.capacity()) + allocated(value.capacity()))
            .sum::<usize>()
}

/// Bytes of the heap buffer of a `Vec` of `capacity` `T`s.
pub(crate) fn vec_footprint<T>(capacity: usize) -> usize {
    allocated(capacity * size_of::<T>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use halyard_codec::QoS;

    fn message(topic: &str, payload: usize, properties: Option<Properties>) -> Message {
        Message {
            topic: topic.to_owned(),
            payload: Bytes::from(vec![0u8; payload]),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: properties.map(Box::new),
            expires_at: None,
            publisher: None,
        }
    }

    #[test]
    fn allocations_round_up_to_the_size_classes() {
        assert_eq!(allocated(0), 0);
        assert_eq!(allocated(1), 8);
        assert_eq!(allocated(19), 24);
        assert_eq!(allocated(64), 64);
        assert_eq!(allocated(65), 80);
        assert_eq!(allocated(120), 128);
        assert_eq!(allocated(129), 160);
        assert_eq!(allocated(4096 + 20), 5120);
        for bytes in 1..10_000 {
            let given = allocated(bytes);
            assert!(given >= bytes, "{bytes} -> {given}");
            assert!(
                given - bytes < bytes / 4 + 8,
                "{bytes} -> {given}: too much slack"
            );
        }
    }

    #[test]
    fn a_small_message_costs_its_allocations_and_its_share_of_the_read_buffer() {
        let topic = "bench/abcdefgh/p/1";
        let m = message(topic, 64, None);
        // `Arc::new` allocates two counters beside the value.
        let shared = allocated(2 * size_of::<usize>() + size_of::<Message>());
        let wire = topic.len() + 64 + PUBLISH_FRAMING;
        assert_eq!(
            message_footprint(&m),
            shared + allocated(topic.len()) + wire + wire / 4
        );
        // Far more than the topic and payload alone, which is all the meter used to count.
        assert!(message_footprint(&m) > 2 * (topic.len() + 64));
    }

    #[test]
    fn forwarded_properties_count_with_what_they_own() {
        let plain = message_footprint(&message("t", 10, None));
        let properties = Properties {
            content_type: Some("application/json".to_owned()),
            user_properties: vec![("key".to_owned(), "a longer value".to_owned())],
            ..Properties::default()
        };
        let with = message_footprint(&message("t", 10, Some(properties)));
        assert!(with >= plain + size_of::<Properties>() + "application/json".len() + 3 + 14);
    }

    #[test]
    fn vec_buffers_count_their_capacity() {
        assert_eq!(vec_footprint::<u32>(0), 0);
        assert_eq!(vec_footprint::<u32>(3), 16);
        assert_eq!(vec_footprint::<u64>(1000), allocated(8000));
    }
}
