//! Who may write where, and over what: rights per broker user (`rights`), checked on the
//! AMQP `user_id` property, which RabbitMQ refuses unless it matches the connection's
//! user; and TLS to both servers (`tls`).

pub mod rights;
pub mod tls;
